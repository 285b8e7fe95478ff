"""The vision tower's patch embedding runs as a matmul (`patch_embed_as_matmul`): same
outputs and weight gradients as the Conv3d it replaces, same parameters and state dict."""

import copy

import pytest
import torch

from stages.models.adapter import load_model, patch_embed_as_matmul


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_patch_embed_matmul_equals_conv3d(family):
    model = load_model("tiny:" + family)
    embed = model.model.visual.patch_embed
    conv = embed.proj
    assert conv.forward.__func__.__name__ == "_conv_as_matmul"  # load_model switched it
    k = conv.kernel_size
    x = torch.randn(37, conv.in_channels * k[0] * k[1] * k[2], generator=torch.Generator().manual_seed(0))

    out = embed(x)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    reference = torch.nn.Conv3d.forward(conv, x.view(-1, conv.in_channels, *k)).view(-1, embed.embed_dim)
    (reference * torch.arange(reference.numel()).view_as(reference).sin()).sum().backward()

    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, conv.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-5)
    assert {name for name, _ in model.named_parameters()} == set(model.state_dict())  # nothing renamed


def test_other_inputs_take_the_convolution_and_copies_use_their_own_weights():
    conv = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True)
    patch_embed_as_matmul(conv)
    video = torch.randn(1, 3, 4, 8, 8)  # several patches per input: a real convolution
    torch.testing.assert_close(conv(video), torch.nn.Conv3d.forward(conv, video))

    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.fill_(1.0)
    patches = torch.randn(5, 3, 2, 4, 4)
    assert torch.equal(twin(patches), torch.ones(5, 8, 1, 1, 1))  # the copy's weights, not the original's
    assert not torch.equal(conv(patches), twin(patches))

    overlapping = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(1, 2, 2))
    patch_embed_as_matmul(overlapping)
    assert "forward" not in vars(overlapping)  # not a per-patch projection: left alone
