"""FedWeIT: shared weights, per-unit masks, sparse adaptive weights and a knowledge base of other clients'.

Each fully trainable Linear/Conv2d becomes a ``WeitLayer`` with
``theta = m * sw + aw + sum_k atten_k * aw_kb[..., k]`` (``aw`` and ``m`` hard-thresholded at ``lambda_l1``
and ``lambda_mask``). A round loads the client's own model, takes the server's ``sw`` and knowledge base,
restarts ``aw = (1 - m) * sw`` and ``atten = 0``, and trains with

    loss + lambda_l1 * (||aw||_1 + ||m||_1) + lambda_l2 * sum over layers ||theta - theta_prev||^2

where ``theta_prev`` is the layer's weight at the end of the client's previous task (kept from its task
switch on; the original compared the model with itself). The client uploads ``theta`` and its thresholded
``aw``; the server sets ``sw`` to the sample-weighted mean of the round's ``theta`` and, once ``kb_cnt``
clients have uploaded, draws the knowledge base from their latest ``aw`` with the experiment's seeded RNG.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..fedavg import Upload, weighted_mean
from ..seeds import generator
from .adaptive import WeitLayer, adapt, adaptive_layers, layer_entries
from .base import LocalRound, Method, ModelOutput, ServerState, no_entry, option
from .counts import count_option
from .switch import finished_task

__all__ = ["FedWeIT", "draw_knowledge_base"]


class FedWeIT(Method):
    """FedWeIT as FedSTIL's code re-implements it, with the approximation loss made real."""

    name = "fedweit"
    runner_schedules_lr = False  # FedSTIL's runner rebuilt its optimizer's groups every epoch
    # FedSTIL's code keeps one checkpoint per task for a client without model_ckpt_name (FEDSTIL.md §3.12).
    models_per_task = True
    defaults = {"lambda_l1": 1e-3, "lambda_l2": 1e-3, "lambda_mask": 0.0, "kb_cnt": 5}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.lambda_l1 = option(self.options, "lambda_l1", 1e-3, method=self.name)
        self.lambda_l2 = option(self.options, "lambda_l2", 1e-3, method=self.name)
        self.lambda_mask = option(self.options, "lambda_mask", 0.0, method=self.name)
        self.kb_cnt = count_option(self.options, "kb_cnt", method=self.name)

    def prepare(self, model: nn.Module) -> nn.Module:
        return adapt(model, lambda layer: WeitLayer(layer, self.kb_cnt, self.lambda_l1, self.lambda_mask))

    # server half -------------------------------------------------------------------------------------
    def payload(self, server: ServerState, client: str, kind: str) -> dict[str, Any]:
        """A new client gets the global model, a known one ``sw``; both get the knowledge base, once drawn."""
        kb = server.extras.get("kb", {})
        if kind == "integrated":
            return {"model": server.model, "kb": kb}
        layers = [key[: -len(".aw_kb")] for key in server.model if key.endswith(".aw_kb")]
        return {"sw": {layer: server.model[f"{layer}.sw"] for layer in layers}, "kb": kb}

    def aggregate(self, server: ServerState, uploads: Mapping[str, Upload]) -> ServerState:
        """``sw`` <- the weighted mean of the round's ``theta``; the knowledge base is drawn anew."""
        aws = {**server.extras.get("aw", {}), **{name: u.extras["aw"] for name, u in uploads.items()}}
        mean = weighted_mean({name: Upload(u.extras["theta"], u.samples) for name, u in uploads.items()})
        model = dict(server.model)
        for layer, value in mean.items():
            model[f"{layer}.sw"] = value
        extras = {**server.extras, "aw": aws}
        if self.kb_cnt and len(aws) >= self.kb_cnt:
            extras["kb"] = draw_knowledge_base(aws, self.kb_cnt, generator(self.seed, server.round, "kb"))
        return ServerState(model, extras)

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every layer's ``sw``, ``aw`` and ``atten``, and ``aw_kb`` once a knowledge base is drawn (the payload
        holds them, ``reset`` restarts the rest); the mask is the client's own. Nothing at a task switch:
        ``start`` first takes the finished task's ``theta`` from the stored model."""
        if switching:
            return no_entry
        layers = [key[: -len(".aw_kb")] for key in server.model if key.endswith(".aw_kb")]
        kb = server.extras.get("kb", {})
        replaced = layer_entries(layers, ("sw", "aw", "atten"))
        drawn = layer_entries([layer for layer in layers if layer in kb], ("aw_kb",))
        return lambda name: replaced(name) or drawn(name)

    # client half -------------------------------------------------------------------------------------
    def start(self, rnd: LocalRound) -> None:
        finished = finished_task(rnd)
        if finished is not None:
            # The weights the finished task ended with, which the approximation loss keeps this task near.
            rnd.memory["previous_theta"] = self.thetas(rnd.previous_model)
        if "model" in rnd.payload:
            rnd.model.load_state_dict(rnd.payload["model"])
        elif rnd.previous_model is None:
            raise ValueError(f"fedweit: client {rnd.client!r} expected its own model or the global one, found neither")
        else:
            rnd.model.load_state_dict(rnd.previous_model)
        sw, kb = rnd.payload.get("sw", {}), rnd.payload.get("kb", {})
        previous = rnd.memory.get("previous_theta", {})
        rnd.scratch["approx"] = []
        for name, layer in adaptive_layers(rnd.model):
            layer.reset(_on(sw.get(name), layer.sw), _on(kb.get(name), layer.sw))
            if name in previous:
                rnd.scratch["approx"].append((layer, previous[name].to(layer.sw.device)))

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        layers = [layer for _, layer in adaptive_layers(rnd.model)]
        if layers and self.lambda_l1:
            loss = loss + self.lambda_l1 * torch.stack([layer.sparsity() for layer in layers]).sum()
        # FedSTIL's runner compared the model with itself, so its approximation loss was always 0 (B14).
        if rnd.scratch["approx"] and self.lambda_l2 and not self.legacy:
            approx = torch.stack([(layer.theta() - before).pow(2).sum() for layer, before in rnd.scratch["approx"]])
            loss = loss + self.lambda_l2 * approx.sum()
        return loss

    def upload(self, model: Mapping[str, torch.Tensor], samples: int, memory: Mapping[str, Any]) -> Upload:
        layers = [key[: -len(".aw_kb")] for key in model if key.endswith(".aw_kb")]
        aw = {layer: self._kept(model[f"{layer}.aw"], self.lambda_l1) for layer in layers}
        return Upload(state={}, samples=samples, extras={"theta": self.thetas(model), "aw": aw})

    def thetas(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every layer's ``theta`` computed from a model state dict (thresholds applied), by layer name."""
        out = {}
        for key in state:
            if not key.endswith(".aw_kb"):
                continue
            layer = key[: -len(".aw_kb")]
            sw = state[f"{layer}.sw"]
            mask = self._kept(state[f"{layer}.mask"], self.lambda_mask).reshape((-1,) + (1,) * (sw.dim() - 1))
            kb = (state[key] * state[f"{layer}.atten"]).sum(-1)
            out[layer] = mask * sw + self._kept(state[f"{layer}.aw"], self.lambda_l1) + kb
        return out

    @staticmethod
    def _kept(values: torch.Tensor, threshold: float) -> torch.Tensor:
        return values * (values.abs() > threshold)


def draw_knowledge_base(aws: Mapping[str, Mapping[str, torch.Tensor]], count: int,
                        gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``count`` clients' ``aw`` drawn without replacement (clients in name order, then permuted by ``gen``),
    stacked per layer on a new last axis in the order drawn."""
    names = sorted(aws)
    drawn = [names[i] for i in torch.randperm(len(names), generator=gen)[:count].tolist()]
    layers = aws[drawn[0]]
    return {layer: torch.stack([aws[name][layer] for name in drawn], dim=-1) for layer in layers}


def _on(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if value is None else value.to(like.device, like.dtype)
