"""Memory-augmented neural network (Santoro et al., 2016, "One-shot learning with MANNs").

Each task is one episode: the CNN encodes all of its images in one batch, then a controller
(feed-forward or LSTM) reads the image-and-label sequence below and talks to an external memory
with cosine content-based reads and least-recently-used-access (LRUA) writes (encoder features
are layer-normalised before the controller). The memory, the usage
weights and the controller state start from zero for every task, so tasks never share anything
(the sequence is vectorised over the task dimension ``T``, the encoder runs once per task because
batch norm uses the statistics of the batch it sees).

Sequence of a task: the support examples in a shuffled order, then every query as one further
step from the state after the support set. ``label_timing`` says when a support label is shown:

* ``"current"`` (default): with its own image, ``(x_t, y_t)``; queries get a zero "unknown" label.
* ``"previous"`` (the paper's protocol): one step late, ``(x_t, y_{t-1})`` (zeros at ``t = 0``);
  queries get the label of the last support example. The controller must then carry ``x_{t-1}`` to
  bind it to ``y_{t-1}``; on the synthetic lesion set that binding was not learned within
  thousands of steps even from pre-trained features, while ``"current"`` learns in a few hundred
  (BENCHMARKS.md). In the paper every image is also a query before its label is shown; with a
  separate query set the late label only delays the binding.

No query ever sees a query label.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.algorithms.base import MetaLearner, check_task_batch
from medmeta.networks.norm import query_statistics, uses_running_statistics

logger = logging.getLogger(__name__)


class MANN(MetaLearner):
    """MANN with an LRUA memory over a meta-batch of tasks with a leading task dimension ``T``.

    Args:
        model: CNN encoder; ``model.features(x)`` gives ``[B, model.feature_dim]`` (its head is unused).
        n_way: number of classes N per episode (label inputs and logits).
        controller_size: hidden size of the controller.
        memory_slots: memory rows per task.
        memory_width: memory columns (key size).
        read_heads: read heads; head ``i`` writes to the ``i``-th least-used slot.
        gamma: usage decay γ.
        controller: ``"feedforward"`` (default; learns fastest on the synthetic set) or ``"lstm"``.
        shuffle_seed: seed of the support order; each task's permutation comes from a private
            ``torch.Generator`` seeded by a hash of ``(shuffle_seed, its support images and labels)``,
            so it is deterministic, varies between episodes, never touches the global RNG and does
            not depend on the task's position in the batch. ``None`` keeps the given order.
        key_strength: fixed factor on the cosine similarities before the read softmax; 1 is the
            paper's addressing, larger values sharpen reads (an NTM-style key strength). With the
            paper's 128 slots and strength 1 a read is close to uniform over the mostly empty
            memory; 32 slots and strength 10 are the defaults here (see BENCHMARKS.md).
        support_loss: also add the cross-entropy of support predictions for examples whose class
            was already shown earlier in the sequence (off by default: query loss only); only with
            ``label_timing="previous"`` (otherwise a support step sees its own label).
        label_timing: ``"current"`` or ``"previous"``: when a support label is fed (see above).
    """

    adapts_in_steps = False  # its adaptation takes no step count: diagnose refuses --steps

    name = "mann"
    transductive_batches = "each task's support and query images together"

    def __init__(
        self,
        model: nn.Module,
        n_way: int,
        *,
        controller_size: int = 128,
        memory_slots: int = 32,
        memory_width: int = 40,
        read_heads: int = 4,
        gamma: float = 0.95,
        controller: Literal["lstm", "feedforward"] = "feedforward",
        shuffle_seed: int | None = 0,
        key_strength: float = 10.0,
        support_loss: bool = False,
        label_timing: Literal["current", "previous"] = "current",
    ) -> None:
        if controller not in ("lstm", "feedforward"):
            raise ValueError(f"controller must be 'lstm' or 'feedforward', got {controller!r}")
        if label_timing not in ("current", "previous"):
            raise ValueError(f"label_timing must be 'current' or 'previous', got {label_timing!r}")
        if support_loss and label_timing == "current":
            raise ValueError("support_loss needs label_timing='previous': a support step sees its own label")
        if not 1 <= read_heads <= memory_slots:
            raise ValueError("need 1 <= read_heads <= memory_slots")
        super().__init__(model, n_way)
        self.n_way, self.slots, self.width, self.heads = n_way, memory_slots, memory_width, read_heads
        self.gamma, self.controller_kind, self.controller_size = gamma, controller, controller_size
        self.shuffle_seed, self.key_strength, self.support_loss = shuffle_seed, key_strength, support_loss
        self.label_timing = label_timing
        self.feature_norm = nn.LayerNorm(model.feature_dim)
        in_size = model.feature_dim + n_way + read_heads * memory_width
        if controller == "lstm":
            self.controller: nn.Module = nn.LSTMCell(in_size, controller_size)
        else:
            self.controller = nn.Sequential(nn.Linear(in_size, controller_size), nn.ReLU())
        self.key = nn.Linear(controller_size, read_heads * memory_width)
        self.alpha = nn.Linear(controller_size, read_heads)
        self.output = nn.Linear(controller_size + read_heads * memory_width, n_way)
        logger.debug(
            "MANN: %s controller %d, memory %dx%d, %d heads, %s labels", controller, controller_size,
            memory_slots, memory_width, read_heads, label_timing,
        )

    def _order(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """Presentation order ``[T, N*K]`` of the support examples of each task (see ``shuffle_seed``)."""
        tasks, shots = support_y.shape
        if self.shuffle_seed is None:
            return torch.arange(shots, device=support_y.device).expand(tasks, -1)
        orders = []
        for task in range(tasks):
            digest = hashlib.blake2b(str(self.shuffle_seed).encode(), digest_size=8)
            for tensor in (support_y[task], support_x[task]):  # exact bytes of the content, any dtype
                raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
                digest.update(raw.cpu().numpy().tobytes())
            generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
            orders.append(torch.randperm(shots, generator=generator))
        return torch.stack(orders).to(support_y.device)

    def _encode(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[T, N*K, F]`` and ``[T, N*Q, F]``, one encoder batch per task.

        With per-step running batch-norm statistics, the queries are encoded on their own as
        query forwards at step 0 (non-transductive); otherwise support and query share one batch.
        """
        if uses_running_statistics(self.model):
            support = torch.stack([self.model.features(sx) for sx in support_x])
            with query_statistics(self.model, 0):
                query = torch.stack([self.model.features(qx) for qx in query_x])
            return support, query
        shots = support_x.shape[1]
        feats = torch.stack([self.model.features(torch.cat([sx, qx])) for sx, qx in zip(support_x, query_x)])
        return feats[:, :shots], feats[:, shots:]

    def _initial_state(self, tasks: int, like: Tensor) -> dict[str, Tensor]:
        """Empty memory, usage, read weights, reads and controller state: the per-episode reset."""
        hidden = like.new_zeros(tasks, self.controller_size)
        return {
            "memory": like.new_zeros(tasks, self.slots, self.width),
            "usage": like.new_zeros(tasks, self.slots),
            "read_w": like.new_zeros(tasks, self.heads, self.slots),
            "reads": like.new_zeros(tasks, self.heads * self.width),
            "hidden": hidden,
            "cell": hidden,
        }

    def _step(
        self, state: dict[str, Tensor], features: Tensor, label: Tensor, *, write: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One time step for a batch of independent sequences: logits ``[B, N]`` and the next state.

        ``write=False`` (the query steps) reads the memory as it is, without the LRUA write: the
        state after a query step is discarded, so its write could only make the query read itself.
        """
        tasks = features.shape[0]
        x = torch.cat([self.feature_norm(features), label, state["reads"]], dim=-1)
        if self.controller_kind == "lstm":
            hidden, cell = self.controller(x, (state["hidden"], state["cell"]))
        else:
            hidden, cell = self.controller(x), state["cell"]
        key = torch.tanh(self.key(hidden)).view(tasks, self.heads, self.width)
        memory, usage = state["memory"], self.gamma * state["usage"]
        if write:
            # Least-used slots from the previous usage (stable sort: deterministic ties); head i gets the i-th.
            least = torch.sort(state["usage"], dim=-1, stable=True).indices[:, : self.heads]
            least_w = F.one_hot(least, self.slots).to(features.dtype)  # [B, H, slots]
            gate = torch.sigmoid(self.alpha(hidden)).unsqueeze(-1)
            write_w = gate * state["read_w"] + (1 - gate) * least_w
            memory = memory * (1 - least_w.amax(dim=1)).unsqueeze(-1)  # zero the least-used slots
            memory = memory + write_w.transpose(1, 2) @ key
            usage = usage + write_w.sum(1)
        similarity = F.normalize(key, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).transpose(1, 2)
        read_w = torch.softmax(self.key_strength * similarity, dim=-1)
        reads = (read_w @ memory).reshape(tasks, -1)
        logits = self.output(torch.cat([hidden, reads], dim=-1))
        new = {"memory": memory, "usage": usage + read_w.sum(1), "read_w": read_w, "reads": reads, "hidden": hidden, "cell": cell}
        return logits, new

    def _sequence_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Query logits ``[T, N*Q, N]``, support logits and labels in presentation order.

        The support set is one sequence (see ``label_timing``). Every query is then a
        single further step from the state after the support set, independently of the other
        queries, so neither the queries' order (sorted by class in a batch) nor their number can
        carry label information.
        """
        check_task_batch(support_x, support_y, query_x, support_y[:, :1])  # no query labels here
        order = self._order(support_x, support_y)
        s_feat, q_feat = self._encode(support_x, query_x)
        s_feat = torch.gather(s_feat, 1, order.unsqueeze(-1).expand_as(s_feat))
        s_y = torch.gather(support_y, 1, order)
        onehot = F.one_hot(s_y, self.n_way).to(s_feat.dtype)
        if self.label_timing == "previous":  # label of step t-1; the queries get the last support label
            labels = torch.cat([torch.zeros_like(onehot[:, :1]), onehot], dim=1)
        else:  # label of step t; the queries get the zero "unknown" label
            labels = torch.cat([onehot, torch.zeros_like(onehot[:, :1])], dim=1)
        tasks, shots, queries = s_feat.shape[0], s_feat.shape[1], q_feat.shape[1]
        state, support_logits = self._initial_state(tasks, s_feat), []
        for step in range(shots):
            logits, state = self._step(state, s_feat[:, step], labels[:, step])
            support_logits.append(logits)
        state = {name: value.repeat_interleave(queries, dim=0) for name, value in state.items()}
        query_label = labels[:, shots].repeat_interleave(queries, dim=0)
        q_logits, _ = self._step(state, q_feat.reshape(tasks * queries, -1), query_label, write=False)
        return q_logits.view(tasks, queries, -1), torch.stack(support_logits, dim=1), s_y

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean query cross-entropy (plus support terms if ``support_loss``) and query logits ``[T, N*Q, N]``."""
        check_task_batch(support_x, support_y, query_x, query_y)
        q_logits, s_logits, s_y = self._sequence_logits(support_x, support_y, query_x)
        losses = F.cross_entropy(q_logits.flatten(0, 1), query_y.flatten(), reduction="none")
        if self.support_loss:
            seen = (s_y.unsqueeze(2) == s_y.unsqueeze(1)).tril(-1).any(-1)  # class shown earlier in the sequence
            s_losses = F.cross_entropy(s_logits.flatten(0, 1), s_y.flatten(), reduction="none")
            losses = torch.cat([losses, s_losses[seen.flatten()]])
        return losses.mean(), q_logits


    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Detached query logits ``[T, N*Q, N]``; adaptation is the forward pass, ``steps`` is ignored."""
        with torch.no_grad():
            return self._sequence_logits(support_x, support_y, query_x)[0].detach()

    @classmethod
    def settings_from_legacy(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Before plug-ins the settings were ``mann_*``; checkpoints older than ``mann_label_timing`` fed labels late."""
        legacy = {"controller": "mann_controller", "memory_slots": "mann_memory_slots", "key_strength": "mann_key_strength"}
        settings = {new: saved[old] for new, old in legacy.items() if old in saved}
        settings["label_timing"] = saved.get("mann_label_timing", "previous")
        return settings
