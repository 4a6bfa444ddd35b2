"""The two plugin registries of the base: preconditioner/loss recipes for train.py and samplers for generate.py.

Built-in entries (EDM's vp/ve/edm recipes, EDM's samplers) register themselves in train.py and generate.py; plugins
register theirs from a module listed in the entry-point group ``edm_aniso.plugins`` (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from typing import Any, Callable, Optional

import click

PLUGIN_GROUP = 'edm_aniso.plugins'


@dataclasses.dataclass
class PrecondEntry:
    name: str                                   # value of train.py --precond
    configure: Callable[[Any, Any], None]       # configure(c, opts): fills c.network_kwargs, c.loss_kwargs, ...
    options: list = dataclasses.field(default_factory=list)  # extra click.Option objects owned by this entry
    help: str = ''                              # one line for --help


@dataclasses.dataclass
class SamplerEntry:
    name: str                                   # value of generate.py --sampler
    sample: Callable[..., Any]                  # sample(net, latents, class_labels=None, randn_like=..., num_steps=..., ...)
    options: list = dataclasses.field(default_factory=list)  # extra click.Option objects owned by this sampler
    check: Optional[Callable[[Any, Any], None]] = None       # check(net, opts): raise click.ClickException if unusable
    help: str = ''
    min_steps: int = 1                          # smallest --steps it accepts (stated in generate.py --help)


PRECONDS: dict[str, PrecondEntry] = {}
SAMPLERS: dict[str, SamplerEntry] = {}
_plugins_loaded = False


def register_precond(entry: PrecondEntry) -> PrecondEntry:
    """Add (or replace) a --precond recipe."""
    PRECONDS[entry.name] = entry
    return entry


def register_sampler(entry: SamplerEntry) -> SamplerEntry:
    """Add (or replace) a --sampler."""
    SAMPLERS[entry.name] = entry
    return entry


def load_plugins() -> None:
    """Import every module named in the entry-point group once; importing a plugin module registers its entries."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        importlib.import_module(ep.value)


def option_owners(entries: dict) -> dict[str, tuple[str, str]]:
    """Map each plugin option's parameter name to (its owners' names joined by '|', the option as spelled on the
    command line). Several entries may share one option (the same click.Option object, or one of the same name);
    owners are listed in alphabetical order, so the text does not depend on which module registered first."""
    owners: dict[str, tuple[list, str]] = {}
    for entry in entries.values():
        for opt in entry.options:
            names, spelled = owners.setdefault(opt.name, ([], opt.opts[0]))
            if entry.name not in names:
                names.append(entry.name)
    return {name: ('|'.join(sorted(names)), spelled) for name, (names, spelled) in owners.items()}


def check_foreign_options(entries: dict, selected: str, opts: dict, flag: str) -> None:
    """Refuse a value given to an option that belongs only to entries other than the selected one."""
    for param, (owner, spelled) in option_owners(entries).items():
        if selected not in owner.split('|') and opts.get(param) is not None:
            raise click.ClickException(f'{spelled} applies only to {flag}={owner} (got {flag}={selected})')
