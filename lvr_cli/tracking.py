"""Experiment tracking: the `[log]` backends besides metrics.jsonl.

Every scalar `run.metric(step, ...)` writes to metrics.jsonl goes to each backend with the same
step (strings such as bench-mrsp's mode name stay in the JSONL); the resolved recipe is the
run's config and the stage's summary its summary. Only rank 0 logs. A backend is imported when
the run first logs, and one the recipe asks for but that is not installed is refused before any
work (`check_installed`, a recipe error: exit 2).

- `tensorboard`: event files in `<run>/tensorboard` (torch's `SummaryWriter`). A resumed run
  rewrites the steps it logs again: its first step is the writer's `purge_step`, so
  TensorBoard drops what a killed run logged from there on, as for any restarted job.
- `wandb`: `log.wandb_project`, `wandb_entity`, `wandb_run_name`, `wandb_tags`; files in
  `<run>/wandb`. Offline (`wandb sync <run>/wandb/offline-run-*` uploads later) unless an API
  key is set (`WANDB_API_KEY` or `wandb login`) or `WANDB_MODE` says otherwise.
- `mlflow`: a local file store in `<run>/mlruns` unless `log.mlflow_tracking_uri` names
  another (a server, `sqlite:///...`); experiment `log.mlflow_experiment`.

wandb and mlflow keep their run id in `<run>/tracking.json`, so a resumed run continues the
same run there. Neither can take a step back, so a resumed run sends them only the steps past
the last one they received: a step appears once, with the value first logged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path

from lvr_cli.sections import RecipeError

EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> module and pip extra
STATE = "tracking.json"


def check_installed(log) -> None:
    """Raise `RecipeError` for the first of `log.backends` that cannot be imported here."""
    for name in log.backends:
        if name in EXTRA and importlib.util.find_spec(EXTRA[name]) is None:
            raise RecipeError(f"log.backends: {name!r} is not installed (pip install 'lvr[{EXTRA[name]}]')")


def scalars(values: dict) -> dict[str, float]:
    """The numeric values of a metrics line (bools as 0/1; strings and None left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


class Trackers:
    """The `[log]` backends of one run (rank 0), opened at the first step or summary they get."""

    def __init__(self, log, run_dir: Path, config: dict, resumed: bool, verbose: bool = False):
        self.section, self.path, self.config = log, Path(run_dir), config
        self.resumed, self.verbose = resumed, verbose
        self.names = [b for b in log.backends if b in EXTRA]
        self.opened: dict[str, object] = {}
        self.state: dict = {}

    def __bool__(self) -> bool:
        return bool(self.names)

    # -- what the run directory calls ----------------------------------------------------------
    def metric(self, step: int, values: dict) -> None:
        if not self.names:
            return
        self._open(first_step=step)
        numbers = scalars(values)
        if "tensorboard" in self.opened:
            w = self.opened["tensorboard"]
            for k, v in numbers.items():
                w.add_scalar(k, v, global_step=step)
            w.flush()
        sent = False
        for name in ("wandb", "mlflow"):
            if name in self.opened and step > self.state.get(f"{name}_last_step", -1):
                getattr(self, f"_{name}_metric")(step, numbers)
                self.state[f"{name}_last_step"] = step
                sent = True
        if sent:
            self._save_state()

    def summary(self, summary: dict) -> None:
        if not self.names:
            return
        self._open(first_step=None)
        if "tensorboard" in self.opened:
            self.opened["tensorboard"].add_text("summary", _code(summary))
        if "wandb" in self.opened:
            self.opened["wandb"].summary.update(scalars(summary))
        if "mlflow" in self.opened:
            client, run_id = self.opened["mlflow"]
            client.log_dict(run_id, summary, "summary.json")

    def close(self, failed: bool = False) -> None:
        for name, handle in self.opened.items():
            if name == "tensorboard":
                handle.close()
            elif name == "wandb":
                handle.finish(exit_code=1 if failed else 0)
            elif name == "mlflow":
                client, run_id = handle
                client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        self.opened.clear()

    # -- opening -------------------------------------------------------------------------------
    def _open(self, first_step: int | None) -> None:
        if self.opened:
            return
        state_file = self.path / STATE
        self.state = json.loads(state_file.read_text()) if self.resumed and state_file.exists() else {}
        log = self.section
        name = log.wandb_run_name or self.path.name
        for backend in self.names:
            self.opened[backend] = getattr(self, f"_open_{backend}")(name, first_step)
        self._save_state()

    def _open_tensorboard(self, name: str, first_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run purges what a killed one logged from its first step on
        purge = first_step if self.resumed and first_step is not None else None
        writer = SummaryWriter(log_dir=str(self.path / "tensorboard"), purge_step=purge)
        if not self.resumed:
            writer.add_text("recipe", _code(self.config))
        return writer

    def _open_wandb(self, name: str, first_step: int | None):
        import wandb

        log = self.section
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key() else "offline")
        run_id = self.state.get("wandb_id") or secrets.token_hex(4)  # wandb ids: [a-z0-9]
        self.state["wandb_id"] = run_id
        return wandb.init(project=log.wandb_project, entity=log.wandb_entity, name=name, tags=log.wandb_tags or None,
                          config=self.config, dir=str(self.path), id=run_id, resume="allow", mode=mode,
                          settings=wandb.Settings(silent=not self.verbose, console="off"))

    def _wandb_metric(self, step: int, numbers: dict) -> None:
        self.opened["wandb"].log(numbers, step=step)

    def _open_mlflow(self, name: str, first_step: int | None):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        log = self.section
        uri = log.mlflow_tracking_uri
        if uri is None:  # MLflow 3 keeps its file store only on request; it is what needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.path / "mlruns").resolve().as_uri()
        client = MlflowClient(tracking_uri=uri)
        run_id = self.state.get("mlflow_run_id")
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(log.mlflow_experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(log.mlflow_experiment)
            tags = {"lvr.stage": str(self.config.get("stage"))}
            run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            self.state["mlflow_run_id"] = run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flat(self.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=params[i:i + 100])
            client.log_dict(run_id, self.config, "recipe.json")
        return client, run_id

    def _mlflow_metric(self, step: int, numbers: dict) -> None:
        from mlflow.entities import Metric

        client, run_id = self.opened["mlflow"]
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])

    def _save_state(self) -> None:
        if not ({"wandb", "mlflow"} & set(self.opened)):
            return
        tmp = self.path / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path / STATE)


def _wandb_key() -> bool:
    """Whether wandb has an API key to go online with (the environment or `wandb login`'s netrc)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _code(data: dict) -> str:
    return "```json\n" + json.dumps(data, indent=2) + "\n```"
