"""Methods that look at a whole task (FedSTIL's prototypes, iCaRL's herding, EWC/MAS/FedCurv importances)
read it in its stored form, 8-bit pixels for ReID, and normalise one batch at a time.

The reference is the path every one of them took before: the whole split normalised to float32 at once
(``ReidTasks.train_data``), handed to the method as its samples. A run is played once each way in the same
process, and every number of the record, every model weight and every stored exemplar must agree to the bit.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from fedevents.engine.config import load_experiment
from fedevents.federated import Federation, Method
from fedevents.federated.methods.icarl import stored_pixels
from fedevents.federated.methods.prototypes import prototypes, split_tail
from fedevents.federated.methods.adaptive import AdaptiveLayer, adapt
from fedevents.federated.reid_data import AugmentOpts

from two_task_play import differences, play

OPTIONS = {
    "fedstil": {"lambda_k": 6, "atten_default": 0.9, "distance_calculate_step": 1},
    "icarl": {"memory_size": 4},
    "ewc": {"lambda": 10.0},
    "mas": {"lambda": 1.0},
    "fedcurv": {"lambda": 1.0},
}


def config(dataset: Path, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = dict(load_experiment(dataset / "experiment.yaml", overrides=["model_opts.width=4"]).data)
    cfg["exp_method"] = method
    cfg["method_opts"] = OPTIONS.get(method, {}) if options is None else options
    if method == "fedstil":
        cfg["model_opts"] = {**cfg["model_opts"], "fine_tuning": ["base.layer4", "classifier"]}
    cfg["task_opts"] = {**cfg["task_opts"], "batch_size": 8, "train_epochs": 1}
    return cfg


def as_floats(fed: Federation) -> Federation:
    """``fed`` with every task's samples stored as the normalised float32 split, as methods took them before."""
    tasks = fed.worker.tasks
    pixels = tasks.train_inputs

    def float_split(client: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = pixels(client, task)
        return tasks.augment_opts.normalise(x), y

    tasks.train_inputs = float_split  # an instance attribute: this federation's source only
    return fed


def normalised(dataset: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with 8-bit exemplars as the float images they stand for (what the float path stores)."""
    opts = AugmentOpts.from_dict(load_experiment(dataset / "experiment.yaml").data["task_opts"]["augment_opts"])
    out = {}
    for name, client in state["clients"].items():
        memory = dict(client["memory"])
        if memory.get("exemplar_x") is not None and memory["exemplar_x"].dtype == torch.uint8:
            memory["exemplar_x"] = opts.normalise(memory["exemplar_x"])
        out[name] = {**client, "memory": memory}
    return {**state, "clients": out}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_run_on_8_bit_samples_matches_the_run_on_the_float_split_to_the_bit(
        two_task_reid: Path, method: str, quiet_logs: None) -> None:
    compact = Federation(config(two_task_reid, method), seed=7)
    reference = as_floats(Federation(config(two_task_reid, method), seed=7))
    assert play(compact, range(1, 4)) == play(reference, range(1, 4))
    kept, before = compact.state_dict(), reference.state_dict()
    assert differences(normalised(two_task_reid, kept), before) == []
    if method == "icarl":
        # The exemplars are the task's pixels: a quarter of the bytes the float path keeps and checkpoints.
        exemplars = [c["memory"]["exemplar_x"] for c in kept["clients"].values()]
        floats = [c["memory"]["exemplar_x"] for c in before["clients"].values()]
        assert all(x.dtype == torch.uint8 and len(x) == 4 for x in exemplars)
        assert sum(x.nbytes for x in floats) == 4 * sum(x.nbytes for x in exemplars)


def test_icarl_resumes_a_checkpoint_that_holds_float_exemplars_exactly(two_task_reid: Path, quiet_logs: None) -> None:
    """A checkpoint written before exemplars were stored as pixels holds them as normalised float images."""
    whole = Federation(config(two_task_reid, "icarl"), seed=7)
    expected = play(whole, range(1, 4))
    first = Federation(config(two_task_reid, "icarl"), seed=7)
    play(first, range(1, 3))
    older = normalised(two_task_reid, first.state_dict())
    assert all(c["memory"]["exemplar_x"].dtype == torch.float32 for c in older["clients"].values())
    buffer = io.BytesIO()
    torch.save(older, buffer)
    buffer.seek(0)
    resumed = Federation(config(two_task_reid, "icarl"), seed=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert play(resumed, range(3, 4)) == expected[4:]
    assert differences(resumed.state_dict(), whole.state_dict()) == []  # pixels again, as an unbroken run's


def test_float_exemplars_no_8_bit_image_gives_are_refused_in_one_line() -> None:
    opts = AugmentOpts(img_size=(8, 8))
    pixels = torch.arange(2 * 3 * 8 * 8).remainder(256).to(torch.uint8).view(2, 3, 8, 8)
    images = opts.normalise(pixels)
    assert torch.equal(stored_pixels(images, opts.normalise, client="c"), pixels)
    # The same images under other norm_std values: no pixel normalises to them under these options.
    other = AugmentOpts(img_size=(8, 8), norm_std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"^icarl: client 'c' has exemplars stored as float images that no 8-bit "
                                         r"image normalises to under this experiment's task_opts.augment_opts; "
                                         r"resume with the augment_opts the checkpoint was written with$"):
        stored_pixels(images, other.normalise, client="c")


def test_prototypes_of_8_bit_images_equal_those_of_the_normalised_split_with_the_exemplars_after_them() -> None:
    from fedevents.federated.backbones import build_reid_model
    from fedevents.federated.seeds import generator

    model = build_reid_model({"name": "resnet18", "num_classes": 5, "width": 4, "last_stride": 1,
                              "fine_tuning": ["base.layer4", "classifier"]}, generator=generator(3, "init"))
    model = adapt(model, lambda layer: AdaptiveLayer(layer, 0.5))
    head, _ = split_tail(model)
    opts = AugmentOpts(img_size=(32, 16))
    pixels = torch.randint(0, 256, (300, 3, 32, 16), generator=generator(3, "pixels"), dtype=torch.uint8)
    floats = prototypes(model, head, opts.normalise(pixels))
    exemplars = floats[:5].to(torch.float16)
    rows = prototypes(model, head, pixels, opts.normalise, then=exemplars)
    assert torch.equal(rows, torch.cat([floats, exemplars.float()]))
    assert torch.equal(prototypes(model, head, pixels, opts.normalise), floats)


class Dtypes(Method):
    """Notes the dtype of the samples ``training_data`` is given (a user's method, as the docs show them)."""

    name = "dtypes"
    seen: list[torch.dtype] = []

    def training_data(self, rnd: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.dtype)
        return x, y


class StoredDtypes(Dtypes):
    stored_inputs = True


@pytest.mark.parametrize(("method", "dtype"), [(Dtypes, torch.float32), (StoredDtypes, torch.uint8)])
def test_a_users_training_data_gets_model_input_unless_it_asks_for_the_stored_form(
        two_task_reid: Path, method: type[Dtypes], dtype: torch.dtype, quiet_logs: None) -> None:
    target = f"{__name__}:{method.__name__}"
    fed = Federation(config(two_task_reid, target, {}), seed=7)
    method.seen = []
    fed.train(client="client-0", task="client-0-task-0", round=1, device="cpu", state="integrated")
    assert method.seen == [dtype]
