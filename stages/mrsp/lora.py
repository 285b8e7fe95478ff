"""LoRA on the language model (`[lora]` in sft/rl recipes), with peft's layers injected in place.

The model keeps its class and its module paths (`adapter.model.model.language_model...`),
so the MR-SP runtime, the SP attention and the shared-prompt forwards run unchanged: each
targeted linear layer of the language model becomes `base_layer` (frozen) + `lora_A`/`lora_B`
(trained). The vision tower gets no adapters and stays frozen.

What is written, so that every consumer of a Hugging Face folder keeps working:
- the model folder (`checkpoints/step_N/`, `final/`) holds the *merged* weights under the
  base model's names (W + B A * alpha / r), so `from_pretrained` loads the trained model and
  the next stage (RL after SFT, eval, push) needs nothing to know about LoRA;
- `lora/` beside them holds the adapter in peft's format (`adapter_config.json`,
  `adapter_model.safetensors`): `PeftModel.from_pretrained(base, folder / "lora")` loads it,
  and a resumed run restores its trainable weights from it (the base weights are those of
  `model.path`, untouched by training).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stages.mrsp.fsdp import load_full_state, sharded

LORA_DIR = "lora"
PEFT_PREFIX = "base_model.model."


def target_regex(modules: list[str]) -> str:
    """peft's `target_modules` as a regex: the named linear layers of the language model only."""
    return r".*language_model\..*\.(" + "|".join(modules) + r")$"


def apply_lora(model, cfg) -> None:
    """Inject LoRA layers (`cfg`: the recipe's `lora` section) into `model` in place; freeze
    everything else."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                        target_modules=target_regex(cfg.target_modules))
    inject_adapter_in_model(config, model)
    model._lvr_lora_config = config
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora.target_modules: {cfg.target_modules} matched no linear layer of the language model")


def has_lora(model) -> bool:
    return getattr(model, "_lvr_lora_config", None) is not None


def merged_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights (`state`, default its own `state_dict`) under the base model's names,
    each LoRA layer merged into its base weight: W + B A * alpha / r, as peft merges a linear
    layer (the training model is left as it is)."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict() if state is None else state
    scaling = {name: m.scaling["default"] for name, m in model.named_modules()
               if isinstance(m, LoraLayer) and "default" in m.lora_A}
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module, leaf = key.split(".base_layer.")
            key = f"{module}.{leaf}"
            if leaf == "weight" and module in scaling:
                a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
                value = value + ((b.float() @ a.float()) * scaling[module]).to(value.dtype)
        out[key] = value.detach()
    return out


def save_pretrained(model, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained(folder)`; with LoRA the merged weights, and the adapter in `lora/`.
    `state`: the weights to write under their `state_dict` names (default: the model's own)."""
    if not has_lora(model):
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    model.save_pretrained(folder, state_dict=merged_state_dict(model, state), safe_serialization=True)
    (folder / LORA_DIR).mkdir(exist_ok=True)
    # peft's PeftModel wraps the model twice (PeftModel.base_model.model), and its files say so
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu()
             for k, v in get_peft_model_state_dict(model, state_dict=state).items()}
    save_file(state, folder / LORA_DIR / "adapter_model.safetensors", metadata={"format": "pt"})
    config = model._lvr_lora_config
    config.base_model_name_or_path = getattr(model.config, "_name_or_path", None)
    config.save_pretrained(str(folder / LORA_DIR))  # adapter_config.json, as PeftModel writes it


def load_adapter_weights(model, folder: Path) -> None:
    """Restore the LoRA weights saved in `folder/lora` into `model` (which has them injected)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = folder / LORA_DIR / "adapter_model.safetensors"
    if not path.exists():
        raise RuntimeError(f"{folder}: no {LORA_DIR}/adapter_model.safetensors to resume the LoRA weights from")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
    if sharded(model):  # each rank copies in its rows
        named = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                 for k, v in state.items()}
        _, unexpected = load_full_state(model, named)
    else:
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise RuntimeError(f"{path}: unexpected LoRA weights {unexpected[:3]}")
