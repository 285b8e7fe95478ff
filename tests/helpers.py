"""Objects tests build the way the stages do, with the schema's defaults."""

from lvr_cli.sections import MrspSection, PromptSection, VideoSection
from stages.mrsp.dist import Grid
from stages.mrsp.runtime import Mode, Runtime


def make_runtime(adapter, grid: Grid | None = None, mode: Mode | None = None, chunk_tokens: int | None = None,
                 video=VideoSection(), prompt=PromptSection()) -> Runtime:
    """A runtime as `stages.setup.make_runtime` builds it from a default recipe."""
    chunk = chunk_tokens if chunk_tokens is not None else MrspSection().logprob_chunk_tokens
    return Runtime(adapter, grid or Grid(), mode or Mode(), chunk_tokens=chunk, video=video, prompt=prompt)
