"""--tracker_project_name reaches both trackers, as accelerate's init_trackers does for diffusers."""

import sys
import types

from sdjax.config import TrainConfig
from sdjax.train.metrics import MetricsWriter


def test_wandb_and_tensorboard_carry_the_project_name(tmp_path, monkeypatch):
    calls = {}

    class Run:
        def log(self, values, step):
            calls.setdefault("log", []).append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(project, config, dir=None):
        calls["init"] = dict(project=project, config=config)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = TrainConfig(output_dir=str(tmp_path), report_to="all", tracker_project_name="minecraft")
    writer = MetricsWriter(cfg, True)
    writer.scalars(3, {"loss": 0.5})
    writer.close()
    assert calls["init"]["project"] == "minecraft"
    assert calls["init"]["config"]["tracker_project_name"] == "minecraft"
    assert calls["log"] == [(3, {"train/loss": 0.5})] and calls["finished"]
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["minecraft"]
