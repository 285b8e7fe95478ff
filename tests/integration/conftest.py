import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic dataset (6 videos of 24 s) shared by the stage tests."""
    from lvr_cli.schema import SynthSpec
    from stages.data.synth import generate

    out = tmp_path_factory.mktemp("data")
    generate(SynthSpec(videos=6, seconds=24.0, fps=2.0, event_seconds=4.0, questions_per_category=1,
                       eval_fraction=0.34), out, seed=1)
    return out


def write_recipe(path, text: str):
    path.write_text(text)
    return path
