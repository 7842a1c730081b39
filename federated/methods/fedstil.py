"""FedSTIL: adaptive layers, prototype rehearsal, task tokens and a relevance-weighted personalised dispatch.

Client: every fully trainable Linear/Conv2d becomes an ``AdaptiveLayer`` (``theta = a * G + A``). A round
loads the client's own model, takes ``G`` from the server's personalised mix, restarts ``a``, ``A`` and the
anchors, computes the prototypes of its task (the head's inputs, see ``prototypes``) and trains the network
after the head on them plus its stored exemplars, with

    loss + lambda_l1 * sum over layers (||a0 - a||_1 + ||A0 - A||_1).

Afterwards it herds exemplars (at most ``lambda_k``, float16) and uploads every layer's ``theta`` and its
task token (the mean prototype). Server: ``G`` of the global model, sent to new clients, is the sample-weighted
mean of the round's ``theta``; a known client gets ``sum_i w_i theta_i`` over every client's latest ``theta``
with ``relevance_weights`` from the token histories.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..fedavg import Upload, weighted_mean
from ..predictions import Prediction, complement_scaled
from .adaptive import AdaptiveLayer, adapt, adaptive_layers, expand_last, layer_entries
from .base import LocalRound, Method, ModelOutput, ServerState, option
from .counts import count_option
from .prototypes import herd_exemplars, prototypes, split_tail, trace_network
from .relevance import relevance_weights

__all__ = ["FedSTIL", "thetas_of_state"]


class FedSTIL(Method):
    """FedSTIL as in its paper's code, with the anchors frozen and one-client dispatch defined."""

    name = "fedstil"
    runner_schedules_lr = False  # FedSTIL's runner rebuilt its optimizer's groups every epoch
    # FedSTIL's code keeps one checkpoint per task for a client without model_ckpt_name (FEDSTIL.md §3.12).
    models_per_task = True
    stored_inputs = True  # prototypes are computed a batch of stored images at a time
    defaults = {"lambda_l1": 1e-4, "lambda_k": 8000, "atten_default": 0.8,
                "distance_calculate_step": 10, "distance_calculate_decay": 0.8}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.lambda_l1 = option(self.options, "lambda_l1", 1e-4, method=self.name)
        self.lambda_k = count_option(self.options, "lambda_k", method=self.name)
        self.atten_default = option(self.options, "atten_default", 0.8, method=self.name)
        self.step = count_option(self.options, "distance_calculate_step", method=self.name, minimum=1)
        self.decay = option(self.options, "distance_calculate_decay", 0.8, method=self.name, minimum=1e-6)
        self._network = None  # the network's FX trace, taken once by plan (each training traces without it)

    def prepare(self, model: nn.Module) -> nn.Module:
        # FedSTIL's runner trained the anchors too (B11); fedevents keeps them fixed unless asked for legacy.
        return adapt(model, lambda layer: AdaptiveLayer(layer, self.atten_default, trainable_anchors=self.legacy))

    def plan(self, model: nn.Module) -> None:
        # Traced once here, not in each training: an FX trace must never run beside another thread's forward.
        self._network = trace_network(model)

    # server half -------------------------------------------------------------------------------------
    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        """A new client gets the global model; a known one ``G`` per layer, mixed by relevance to it."""
        if kind == "integrated":
            return {"model": server.model}
        thetas = server.extras.get("theta", {})
        tokens = server.extras.get("tokens", {})
        if client not in thetas:
            # Nothing of this client reached the server yet: it gets the global G, like a new client.
            return {"global": _globals(server.model, _layers(server.model))}
        others = {name: tokens[name] for name in sorted(thetas) if name != client}
        weights = relevance_weights(tokens[client][-1], others, step=self.step, decay=self.decay)
        order = [*others, client]
        mix = {layer: sum(float(w) * thetas[name][layer].double() for w, name in zip(weights, order))
               for layer in thetas[client]}
        return {"global": {layer: value.float() for layer, value in mix.items()}}

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        """``G`` <- the weighted mean of the round's ``theta``; every upload's ``theta`` and token are kept."""
        thetas = dict(server.extras.get("theta", {}))
        tokens = {name: list(history) for name, history in server.extras.get("tokens", {}).items()}
        for name in sorted(uploads):
            thetas[name] = uploads[name].extras["theta"]
            tokens.setdefault(name, []).append(uploads[name].extras["token"])
        mean = weighted_mean({name: Upload(u.extras["theta"], u.samples) for name, u in uploads.items()})
        model = dict(server.model)
        for layer, value in mean.items():
            # theta = G at the start of a round: a stays atten_default, A follows G (the anchors, under legacy
            # stored too, are a and A).
            model[f"{layer}.G"] = value
            model[f"{layer}.A"] = complement_scaled(model[f"{layer}.a"], value)
            if f"{layer}.A0" in model:
                model[f"{layer}.A0"] = model[f"{layer}.A"]
        return ServerState(model, {**server.extras, "theta": thetas, "tokens": tokens})

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every adaptive layer's ``G``, ``a``, ``A`` and anchors: a known client's payload holds ``G`` for
        every layer and ``receive`` restarts the rest from it; bias, norms and frozen weights are its own."""
        return layer_entries(_layers(server.model), ("G", "a", "A", "a0", "A0"))

    def server_predictions(self, server: ServerState) -> dict[tuple[str, ...], Prediction]:
        """The global model's ``A``, which is ``(1 - a) G`` by construction (``aggregate``), and every client's
        latest ``theta``, close to ``G``, their weighted mean."""
        layers = _layers(server.model)
        out = {("model", f"{layer}.A"): Prediction("complement-scaled",
                                                   (("model", f"{layer}.a"), ("model", f"{layer}.G")))
               for layer in layers}
        for client, thetas in server.extras.get("theta", {}).items():
            out.update({("extras", "theta", client, layer): Prediction("same", (("model", f"{layer}.G"),))
                        for layer in thetas if layer in layers})
        return out

    def upgrade(self, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model`` without the fixed anchors ``a0`` and ``A0`` (checkpoints of format 4 stored them); under
        legacy they train, so they stay."""
        if self.legacy:
            return dict(model)
        anchors = layer_entries(_layers(model), ("a0", "A0"))
        return {name: tensor for name, tensor in model.items() if not anchors(name)}

    # client half -------------------------------------------------------------------------------------
    def start(self, rnd: LocalRound) -> None:
        if "model" in rnd.payload:
            rnd.model.load_state_dict(rnd.payload["model"])
        elif rnd.previous_model is None:
            raise ValueError(f"{self.name}: client {rnd.client!r} expected its own model or the global one, "
                             "found neither")
        else:
            rnd.model.load_state_dict(rnd.previous_model)
        received = rnd.payload.get("global", {})
        for name, layer in adaptive_layers(rnd.model):
            self.receive(layer, received.get(name))

    def receive(self, layer: nn.Module, weight: torch.Tensor | None) -> None:
        """Restart ``layer`` for a round from the weight the server sent (its own ``G`` when none)."""
        layer.reset(None if weight is None else weight.to(layer.G.device))

    def training_data(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's prototypes and the stored exemplars; training runs the network after the head on them."""
        head, tail = split_tail(rnd.model, self._network)
        ex_x = rnd.memory.get("exemplar_x")
        # One tensor for the task's prototypes and the exemplars after them: no second copy of the prototypes.
        rows = prototypes(rnd.model, head, x, rnd.model_input, then=ex_x)
        protos = rows[: len(x)]
        rnd.memory["token"] = protos.flatten(1).mean(0)
        rnd.scratch["tail"], rnd.scratch["current"] = tail, (protos, y)
        rnd.forward = lambda pb: _output(tail(pb))
        rnd.augment = None  # flips and crops are for images, not for feature maps
        if ex_x is None or not len(ex_x):
            return protos, y
        return rows, torch.cat([y, rnd.memory["exemplar_y"].to(y)])

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        if not self.lambda_l1:
            return loss
        drift = torch.stack([layer.drift() for _, layer in adaptive_layers(rnd.model)]).sum()
        return loss + self.lambda_l1 * drift

    def finish(self, rnd: LocalRound) -> None:
        """Herd this task's exemplars into the store (none when ``lambda_k`` is 0)."""
        protos, y = rnd.scratch["current"]
        seen = sorted(set(rnd.memory.get("seen", [])) | set(y.tolist()))
        rnd.memory["seen"] = seen
        if not self.lambda_k:
            return
        stored = (rnd.memory.get("exemplar_x", protos[:0]), rnd.memory.get("exemplar_y", y[:0]))
        rnd.memory["exemplar_x"], rnd.memory["exemplar_y"] = herd_exemplars(
            rnd.scratch["tail"], (protos, y), stored, seen, self.lambda_k)

    def upload(self, model: Mapping[str, torch.Tensor], samples: int, memory: Mapping[str, Any]) -> Upload:
        return Upload(state={}, samples=samples, extras={"theta": self.thetas(model), "token": memory["token"]})

    @staticmethod
    def thetas(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every adaptive layer's ``theta`` computed from a model state dict, by layer name."""
        return thetas_of_state(state)


def thetas_of_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every adaptive layer's ``theta = a * G + A`` from a model state dict, by layer name."""
    out = {}
    for layer in _layers(state):
        g, a = state[f"{layer}.G"], state[f"{layer}.a"]
        out[layer] = expand_last(a, g) * g + state[f"{layer}.A"]
    return out


def _layers(state: Mapping[str, Any]) -> list[str]:
    """The names of the adaptive layers whose entries ``state`` holds (each has ``G``, ``a`` and ``A``)."""
    return [key[: -len(".G")] for key in state
            if key.endswith(".G") and f"{key[:-2]}.a" in state and f"{key[:-2]}.A" in state]


def _globals(model: Mapping[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    return {layer: model[f"{layer}.G"] for layer in layers}


def _output(out: Any) -> ModelOutput:
    if isinstance(out, tuple):
        return ModelOutput(out[0], out[1])
    return ModelOutput(out, out)
