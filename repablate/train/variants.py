"""A run is named by what it trains: ``check_variant`` refuses a composition that contradicts the variant that
names the run (``+variant=NAME``; what it pins, ``variant_pins``, is read from conf/variant/NAME.yaml itself), and
``choice_fields`` records in results.json the option Hydra composed in every config group.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from repablate.results import CHOICE_PREFIX, flatten
from repablate.train.validation import ConfigError


class VariantContradiction(ConfigError):
    """The composition contradicts its variant: the run would be recorded under a name it does not train."""


@dataclass
class VariantPins:
    """What ``+variant=NAME`` fixes, read from conf/variant/NAME.yaml itself: the option of each group its defaults
    list overrides (``groups``), and every value it sets, those options' contents included (``values``, dotted keys
    as ``flatten`` writes them). ``nodes`` maps each pinned group to the config node its option fills."""

    groups: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)


def _config_repository(hydra_cfg: DictConfig):
    """Hydra's repository of the run's config sources (conf/, and any a user added), for reading option files."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    search_path = ConfigSearchPathImpl()
    for source in hydra_cfg.runtime.config_sources:
        search_path.append(source.provider, f"{source.schema}://{source.path}")
    return ConfigRepository(search_path)


def _leaves(node: Any, package: str) -> dict[str, Any]:
    """An option file's keys as dotted leaves where they land in the composed config (``package``)."""
    values = flatten(OmegaConf.to_container(node, resolve=False), prefix="")
    return {f"{package}.{key}" if package else key: value for key, value in values.items()}


def _package(header: Mapping[str, Any], group: str) -> str:
    package = header.get("package")
    if package == "_global_":
        return ""
    return group.replace("/", ".") if package in (None, "_group_") else package


def variant_pins(name: str, repository) -> VariantPins:
    """What conf/variant/``name``.yaml pins (``VariantPins``), read through Hydra's config ``repository``."""
    from hydra.core.default_element import GroupDefault

    variant = repository.load_config(f"variant/{name}")
    pins = VariantPins()
    for default in variant.defaults_list or []:
        if not isinstance(default, GroupDefault) or not isinstance(default.value, str):
            continue
        group = default.group[1:] if default.group.startswith("/") else f"variant/{default.group}"
        option = repository.load_config(f"{group}/{default.value}")
        pins.groups[group] = default.value
        pins.nodes[group] = _package(option.header, group)
        pins.values.update(_leaves(option.config, pins.nodes[group]))
    pins.values.update(_leaves(variant.config, _package(variant.header, "variant")))
    return pins


def _as_override(key: str, value: Any) -> str:
    """``key=value`` as one would type it on the command line."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return f"{key}={text}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _conflicts(
    pins: VariantPins, choices: Mapping[str, Any], actual: Mapping[str, Any], skip: str = ""
) -> list[tuple[str, str, str]]:
    """``(key, what the variant sets, what was composed)`` for each pin that ``choices`` (Hydra's runtime choices)
    and ``actual`` (the composed config's leaves) contradict; keys equal to ``skip`` are not compared."""
    found = []
    for group, option in pins.groups.items():
        if choices.get(group) != option:
            found.append((group, f"{group}={option}", _as_override(group, choices.get(group))))
    contradicted = tuple(f"{pins.nodes[key]}." for key, _, _ in found if pins.nodes.get(key))
    for key, value in pins.values.items():
        if key == skip or key.startswith(contradicted):
            continue
        if key not in actual:
            found.append((key, _as_override(key, value), f"~{key}"))
        elif actual[key] != value:
            found.append((key, _as_override(key, value), _as_override(key, actual[key])))
    for group, node in pins.nodes.items():  # a key added to a pinned option changes that option too
        if node and choices.get(group) == pins.groups[group]:
            for key in actual:
                if key.startswith(f"{node}.") and key not in pins.values:
                    found.append((key, f"no {key}", _as_override(key, actual[key])))
    return found


def check_variant(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """``VariantContradiction`` (one message naming both sides) when the composition contradicts the variant that
    names the run: a config group set to another option than the variant's (``+variant=plain block=repconv``), a
    key of a pinned option changed (``block.use_1x1=false``), a value the variant sets changed (``lr_scale`` under
    ``+variant=repconv_lr``), or a ``variant:`` set without ``+variant``. Keys no variant sets (``optimizer.lr``,
    ``seed``, ...) stay free: results.json records them and the analysis keeps runs that differ in them apart.

    ``hydra_cfg``: the run's Hydra node (``HydraConfig.get()``), for its runtime choices, command-line overrides
    and config sources; conf/variant/NAME.yaml itself says what the variant pins (``variant_pins``).
    """
    choices = hydra_cfg.runtime.choices
    name = choices.get("variant")
    if name is None:
        named = cfg.get("variant", "default")
        if named != "default":
            raise VariantContradiction(
                f"variant={named} names the run {named}, but no +variant= chose that variant, so nothing says the "
                f"run trains it: use +variant={named}, or leave variant out (the run is then named default)"
            )
        return
    repository = _config_repository(hydra_cfg)
    actual = flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}, prefix="")
    conflicts = _conflicts(variant_pins(name, repository), choices, actual)
    if not conflicts:
        return
    given = [override.split("=", 1)[0].lstrip("~+") for override in hydra_cfg.overrides.task]
    sources: dict[str, list[str]] = {}
    for key, _, chosen in conflicts:
        on_command_line = any(key == k or key.startswith(f"{k}.") for k in given)
        sources.setdefault("the command line" if on_command_line else "the composition", []).append(chosen)
    chose = _and([f"{source} chose {_and(items)}" for source, items in sources.items()])
    others = [
        f"+variant={other}"
        for other in repository.get_group_options("variant")
        if other != name and not _conflicts(variant_pins(other, repository), choices, actual, skip="variant")
    ]
    instead = f"use a variant it agrees with ({' or '.join(others)}), " if others else ""
    raise VariantContradiction(
        f"+variant={name} sets {_and([pinned for _, pinned, _ in conflicts])}, but {chose}: a run is named by its "
        f"variant (results.json, wandb, the run directory), and this one would not train {name}. Drop the "
        f"override, {instead}leave out +variant (the run is then named default), or add a variant to conf/variant/"
    )


def choice_fields(choices: Mapping[str, Any]) -> dict[str, Any]:
    """results.json's ``choice/<group>``: the option Hydra composed in every config group (its runtime choices),
    Hydra's own groups left out; ``choice/variant`` is null without ``+variant``."""
    fields: dict[str, Any] = {f"{CHOICE_PREFIX}variant": None}
    for group, option in choices.items():
        if group != "hydra" and not group.startswith("hydra/"):
            fields[CHOICE_PREFIX + group] = (
                option
                if option is None or isinstance(option, str)
                else json.dumps(OmegaConf.to_container(option) if OmegaConf.is_config(option) else list(option))
            )
    return fields
