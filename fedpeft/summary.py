"""Parameter summaries: what trains, what it weighs, and what a personalization split sends per round.

``parameter_summary(model, personal=None)`` counts, over the *unique* parameters of ``model`` (tied ones once)::

    total      = Σ_p numel(p)
    trainable  = Σ_{p : p.requires_grad} numel(p)
    trainable% = 100 · trainable / total

and, for a personalization split ``personal`` (the patterns of :func:`fedpeft.fed.personal_keys`: globs, words or a
preset such as ``"fedperfix"``), over the trainable parameters by name (:func:`fedpeft.fed.trainable_keys`)::

    personal = trainable keys selected by ``personal``     (kept on the client, not averaged)
    shared   = the other trainable keys                    (sent every round and averaged by the server)
    params   = Σ_k numel(k),  bytes = Σ_k numel(k) · element_size(k)   (in the parameters' own dtypes)

which is exactly ``fed.num_params`` / ``fed.num_bytes`` of ``fed.split(fed.trainable_state(model), keys)``.
``personal=None`` means no split: every trainable parameter is shared. A split says what is *averaged*; a method
may send personal state too (pFedPG's clients return their trained prompts, from which the server forms ΔP).

Every fedpeft wrapper (``VPT``, ``ParallelPrefix``, ``Prefix`` and their compositions) inherits
:class:`SummaryMixin`: ``model.summary(personal)``, ``model.print_trainable_parameters(personal)`` (peft's name;
its first line carries peft's) and a short ``repr`` showing the wrapper chain down to the user's model instead of the whole ViT tree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Iterable, List, Optional, Tuple, Union

from torch import nn

from . import fed
from ._wrapping import wrapper_chain

__all__ = ["ParameterSummary", "SummaryMixin", "parameter_summary", "wrapper_tree"]

Patterns = Union[str, Iterable[str]]


@dataclass(frozen=True)
class ParameterSummary:
    """Counts for one model (see the module docstring for the definitions); ``str()`` gives a printable report.

    Attributes:
        method: the wrapper chain, outermost first (``"ParallelPrefix+VPT"``), or the class name of a plain model.
        total_params, trainable_params: unique parameters, all / with ``requires_grad``.
        trainable_bytes: bytes of the trainable parameters (their own dtypes).
        split: the personalization patterns as given (``None``: no split).
        shared_keys, personal_keys: the trainable parameter names on each side of the split (sorted).
        shared_params, shared_bytes: what is sent and averaged each round.
        personal_params, personal_bytes: what stays on the client (not averaged).
        notes: what a wrapper says about its setting (``summary_notes()``), e.g. a ``ParallelPrefix`` on a frozen
            backbone, where FedPerfix trains the whole ViT; printed as ``note:`` lines.
    """

    method: str
    total_params: int
    trainable_params: int
    trainable_bytes: int
    split: Optional[Tuple[str, ...]]
    shared_keys: Tuple[str, ...]
    personal_keys: Tuple[str, ...]
    shared_params: int
    shared_bytes: int
    personal_params: int
    personal_bytes: int
    notes: Tuple[str, ...] = ()

    @property
    def trainable_percent(self) -> float:
        """100 · trainable / total (0.0 for a model without parameters)."""
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def trainable_line(self) -> str:
        """peft's ``print_trainable_parameters`` line: ``trainable params: … || all params: … || trainable%: …``."""
        return (
            f"trainable params: {self.trainable_params:,d} || all params: {self.total_params:,d} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )

    def __str__(self) -> str:
        split = "none (every trainable parameter is shared)" if self.split is None else list(self.split)
        return "\n".join([
            f"{self.method}: {self.trainable_line()}",
            f"personalization split: {split}",
            f"  shared   (sent and averaged each round): {self.shared_params:,d} params, "
            f"{_size(self.shared_bytes)} in {_tensors(len(self.shared_keys))}",
            f"  personal (kept on the client):           {self.personal_params:,d} params, "
            f"{_size(self.personal_bytes)} in {_tensors(len(self.personal_keys))}",
            *(f"note: {n}" for n in self.notes),
        ])


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _size(num_bytes: int) -> str:
    """``1,536 B (1.5 KiB)``: exact bytes, then a binary-prefixed size from 1 KiB on."""
    text = f"{num_bytes:,d} B"
    if num_bytes < 1024:
        return text
    value, units = num_bytes / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{text} ({value:.1f} {units[0]})"


def _check_patterns(personal: Optional[Patterns]) -> Optional[Tuple[str, ...]]:
    if personal is None:
        return None
    patterns = (personal,) if isinstance(personal, str) else personal
    if isinstance(patterns, (bytes, nn.Module)) or not isinstance(patterns, Iterable):
        raise TypeError(
            "personal must be None, a pattern str or an iterable of them (globs, words, presets of "
            f"fed.personal_keys), got {type(personal).__name__}"
        )
    patterns = tuple(patterns)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"personal patterns must be str, got {type(bad[0]).__name__} {bad[0]!r}")
    return patterns


def _method(model: nn.Module) -> str:
    chain = wrapper_chain(model)
    return "+".join(type(w).__name__ for w in chain) if chain else type(model).__name__


def parameter_summary(model: nn.Module, personal: Optional[Patterns] = None) -> ParameterSummary:
    """Trainable / total parameters of ``model`` and the per-round size of each side of the split ``personal``.

    Args:
        model: any ``nn.Module`` (a fedpeft wrapper, a composition, or a plain model).
        personal: ``fed.personal_keys`` patterns (e.g. ``"fedperfix"``, ``["prompts", "head"]``,
            ``["fedperfix", "*blocks.11.*"]``) or ``None`` for no split.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``personal`` is not None / str / iterable of str.
        ValueError: a bare word in ``personal`` that ``fed.personal_keys`` does not know.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patterns = _check_patterns(personal)
    params = list(model.parameters())  # unique: tied parameters count once
    trainable = [p for p in params if p.requires_grad]
    named = dict(model.named_parameters(remove_duplicate=False))
    trainable_names = fed.trainable_keys(model)
    selected = set(fed.personal_keys(model, patterns)) if patterns is not None else set()
    personal_names = [k for k in trainable_names if k in selected]
    shared_names = [k for k in trainable_names if k not in selected]

    def count(names: List[str]) -> Tuple[int, int]:
        return (
            sum(named[k].numel() for k in names),
            sum(named[k].numel() * named[k].element_size() for k in names),
        )

    shared_params, shared_bytes = count(shared_names)
    personal_params, personal_bytes = count(personal_names)
    return ParameterSummary(
        method=_method(model),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        split=patterns,
        shared_keys=tuple(shared_names),
        personal_keys=tuple(personal_names),
        shared_params=shared_params,
        shared_bytes=shared_bytes,
        personal_params=personal_params,
        personal_bytes=personal_bytes,
        notes=tuple(n for w in wrapper_chain(model) for n in getattr(w, "summary_notes", lambda: [])()),
    )


def _own_params(wrapper: nn.Module) -> int:
    """Parameters a wrapper adds: its own, not those of the module it wraps."""
    inner = {id(p) for p in wrapper.model.parameters()}
    return sum(p.numel() for p in wrapper.parameters() if id(p) not in inner)


def _describe(wrapper: nn.Module) -> str:
    """``Class(settings, child=Child(settings))``: the wrapper's ``extra_repr`` plus its own parameterised, non-container
    children (a VPT's prompt module, e.g. ``prompts=LowRankPrompt(...)``); ``model`` is the next line of the tree."""
    parts = [wrapper.extra_repr()] if wrapper.extra_repr() else []
    for name, child in wrapper.named_children():
        containers = (nn.ModuleDict, nn.ModuleList, nn.Sequential)
        if name != "model" and not isinstance(child, containers) and any(True for _ in child.parameters()):
            parts.append(f"{name}={type(child).__name__}({child.extra_repr()})")
    return f"{type(wrapper).__name__}({', '.join(parts)})"


def wrapper_tree(model: nn.Module) -> str:
    """The wrapper chain, one line per wrapper (its settings and own parameters), down to the user's model; for
    ``ParallelPrefix(VPT(timm.create_model("test_vit", num_classes=5), num_prompts=4, deep=True), bottleneck=8)``::

        ParallelPrefix(bottleneck=8, scale=1.5, blocks=[0, 1, 2, 3, 4, 5], init='fedperfix', …)  [own params: 10,032]
        └─ VPT(num_prompts=4, deep=True, prompt_depth=6)  [own params: 1,536]
           └─ VisionTransformer  [params: 306,565, trainable: 325]
        trainable params: 11,893 || all params: 318,133 || trainable%: 3.7384
    """
    chain = wrapper_chain(model)
    lines = []
    for depth, w in enumerate(chain):
        indent = "" if depth == 0 else "   " * (depth - 1) + "└─ "
        lines.append(f"{indent}{_describe(w)}  [own params: {_own_params(w):,d}]")
    base = chain[-1].model if chain else model
    base_params = list(base.parameters())
    base_total = sum(p.numel() for p in base_params)
    base_trainable = sum(p.numel() for p in base_params if p.requires_grad)
    indent = "   " * (len(chain) - 1) + "└─ " if chain else ""
    lines.append(f"{indent}{type(base).__name__}  [params: {base_total:,d}, trainable: {base_trainable:,d}]")
    lines.append(parameter_summary(model).trainable_line())
    return "\n".join(lines)


class SummaryMixin:
    """``summary``, ``print_trainable_parameters`` and a chain ``repr`` for fedpeft wrappers (first base class)."""

    def summary(self, personal: Optional[Patterns] = None) -> ParameterSummary:
        """:func:`parameter_summary` of this model; ``print(model.summary("fedperfix"))`` for the report."""
        return parameter_summary(self, personal)  # type: ignore[arg-type]

    def print_trainable_parameters(self, personal: Optional[Patterns] = None, file: Optional[IO[str]] = None) -> None:
        """Write the summary to ``file`` (default ``sys.stdout``), like peft's method of the same name.

        Its first line is the method chain and peft's ``trainable params: … || all params: … || trainable%: …``;
        the next lines give
        the shared / personal sizes under ``personal``. Writing is this method's purpose; nothing else prints.
        """
        text = str(self.summary(personal))
        (sys.stdout if file is None else file).write(text + "\n")

    def __repr__(self) -> str:
        """The wrapper chain and counts (``print(model.unwrap())`` shows the timm model's own module tree)."""
        return wrapper_tree(self)  # type: ignore[arg-type]
