"""The shared training loop's choice of weights: the last epoch's by default, the best epoch's by
its `select` figure when asked, and a setting that cannot choose is refused before training."""

from __future__ import annotations

import pytest
import torch

from ops.errors import PitomeError
from pipelines.learning.loop import LoopSettings, epoch_file, epoch_of_file, make_accelerator, train
from pipelines.learning.samples import Samples


class ScriptedScores:
    """A regression task whose validation figure after each epoch is scripted, so the best
    epoch is known in advance; the weights still change every step."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = iter(scores)

    def loss(self, model, batch):
        return (model(batch["x"]) - batch["y"]).pow(2).mean(), {}

    def evaluate(self, model):
        return {"score": next(self.scores)}


def run(tmp_path, scores: list[float], **settings) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    samples = Samples(lambda i: {"x": x[i], "y": y[i]}, 16)
    fields = {"select": "score", "keep_epochs": True, **settings}
    loop_settings = LoopSettings(epochs=len(scores), batch_size=4, lr=0.1, **fields)
    result = train(model, ScriptedScores(scores), samples, loop_settings, tmp_path / "checkpoint.pt", {},
                   make_accelerator(cpu=True))  # fmt: skip
    return model, result


def kept(tmp_path, epoch: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(epoch_file(tmp_path / "checkpoint.pt", epoch)))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_epoch_is_published_by_default_and_the_best_is_still_recorded(tmp_path):
    model, result = run(tmp_path, [0.5, 0.9, 0.7])
    assert result.epoch == 3 and same(result.weights, kept(tmp_path, 3)) and same(result.weights, model.state_dict())
    assert (result.state.best_epoch, result.state.best_value) == (2, 0.9)
    assert not same(kept(tmp_path, 2), kept(tmp_path, 3))  # the choice matters: the weights differ


def test_publish_best_returns_the_best_epochs_weights(tmp_path):
    _, result = run(tmp_path, [0.5, 0.9, 0.7], publish="best")
    assert result.epoch == 2 and same(result.weights, kept(tmp_path, 2))


@pytest.mark.parametrize("settings", [{"publish": "first"}, {"publish": "best", "select": None}])
def test_a_publish_setting_that_cannot_choose_is_refused(tmp_path, settings):
    with pytest.raises(PitomeError, match="publish="):
        run(tmp_path, [0.5], **settings)


def test_kept_epoch_files_are_read_back_by_their_own_name_only(tmp_path):
    assert epoch_of_file(epoch_file(tmp_path / "checkpoint.pt", 12)) == 12
    assert [epoch_of_file(name) for name in ("epoch-x.safetensors", "epoch-1.pt", "best-1.safetensors")] == [None] * 3
