"""The workflow configuration: one schema, one validation, for the workflow and every sub-command.

The JSON schema (YAML) ships inside the package (``prrtquant/data/config.schema.yaml``), so the
Snakefile, the ``prrtquant`` sub-commands and a wheel installed anywhere validate against the same
file. Validation fills in the schema's defaults, exactly as Snakemake's ``validate()`` does, and
rejects unknown keys, wrong types and out-of-range values with a message naming the key.

A stage run by hand may be given a config that holds only some sections (``ingest:`` alone, say):
:func:`load_config` accepts that, because ``patients`` (the sheet) is needed by the workflow only.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "CONFIG_SCHEMA", "PATIENTS_SCHEMA", "schema", "validate_config", "load_config",
           "stage_config", "coerce_command_line_values", "validate_sheet_row",
           "check_unique_patients"]

#: the schema files, as paths usable by Snakemake's ``validate()`` (package data)
CONFIG_SCHEMA = Path(str(resources.files("prrtquant") / "data" / "config.schema.yaml"))
PATIENTS_SCHEMA = Path(str(resources.files("prrtquant") / "data" / "patients.schema.yaml"))


def schema(which: str = "config") -> dict[str, Any]:
    """The parsed schema: ``config`` or ``patients``."""
    path = {"config": CONFIG_SCHEMA, "patients": PATIENTS_SCHEMA}[which]
    return yaml.safe_load(path.read_text())


def _validator(sch: Mapping[str, Any]) -> Any:
    """A Draft 2020-12 validator that also sets each property's default (the jsonschema FAQ recipe,
    the one Snakemake's ``validate(set_default=True)`` uses)."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, sch_: Any) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base(validator, properties, instance, sch_)

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(sch)


def validate_config(cfg: Mapping[str, Any] | None, source: str = "config",
                    require_patients: bool = False) -> dict[str, Any]:
    """Validate ``cfg`` against the schema and return a copy with every default filled in.

    >>> c = validate_config({"quantify": {"threshold": 4.0}})
    >>> c["quantify"]["threshold"], c["quantify"]["max_lesions"], c["ingest"]["weight_fallback"]
    (4.0, 5, 'error')
    >>> validate_config({"quantify": {"treshold": 4.0}})
    Traceback (most recent call last):
    ...
    prrtquant.errors.ConfigError: config: quantify: Additional properties are not allowed ('treshold' was unexpected)
    """
    data = copy.deepcopy(dict(cfg or {}))
    sch = schema("config")
    if not require_patients:
        sch = {k: v for k, v in sch.items() if k != "required"}
    errors = sorted(_validator(sch).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path)
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{e.message}")
    from .plausibility import PlausibilitySettings

    try:  # what the schema cannot say: every range is [low, high] with low < high
        PlausibilitySettings.from_config(data.get("plausibility"))
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return data


def _coerce(value: Any, sch: Mapping[str, Any]) -> Any:
    types = sch.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if isinstance(value, dict) and isinstance(sch.get("properties"), dict):
        for k, v in value.items():
            if k in sch["properties"]:
                value[k] = _coerce(v, sch["properties"][k])
        return value
    if isinstance(value, list) and isinstance(sch.get("items"), dict):
        return [_coerce(v, sch["items"]) for v in value]
    if not isinstance(value, str) or "string" in types:
        return value
    text_ = value.strip()
    if "null" in types and text_.lower() in ("null", "none", "~", ""):
        return None
    if "boolean" in types and text_.lower() in ("true", "false"):
        return text_.lower() == "true"
    if "integer" in types:
        try:
            return int(text_)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(text_)
        except ValueError:
            pass
    if "array" in types or "object" in types:
        try:
            return _coerce(yaml.safe_load(text_), sch)
        except yaml.YAMLError:
            pass
    return value


def coerce_command_line_values(config: dict[str, Any]) -> dict[str, Any]:
    """Give ``snakemake --config`` values their schema types, in place.

    Snakemake parses a nested ``--config quantify="{threshold: 4.5}"`` without types (every value a
    string), so the schema would refuse ``'4.5'``. Strings where the schema wants a number, integer,
    boolean, null, array or object are converted when they parse as one; everything else is left for
    validation to judge.

    >>> coerce_command_line_values({"quantify": {"threshold": "4.5", "max_lesions": "3"}})["quantify"]
    {'threshold': 4.5, 'max_lesions': 3}
    """
    return _coerce(config, schema("config"))


def load_config(path: str | Path | None, require_patients: bool = False) -> dict[str, Any]:
    """Read a config YAML (``None``: an empty one) and validate it (defaults filled in)."""
    if path is None:
        return validate_config({}, "defaults")
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping, got {type(raw).__name__}")
    return validate_config(raw, str(path), require_patients=require_patients)


def validate_sheet_row(row: Mapping[str, Any], source: str) -> None:
    """Check one patient-sheet row (all values as text) against the sheet schema the workflow uses.

    >>> validate_sheet_row({"patient": "P1", "dicom_dir": "d", "design": "lobar_ia", "camera_cps_per_mbq": "abc"},  # doctest: +ELLIPSIS
    ...                    "sheet.tsv")
    Traceback (most recent call last):
    ...
    prrtquant.errors.ConfigError: sheet.tsv: patient P1: camera_cps_per_mbq: 'abc' does not match ...
    """
    errors = sorted(_validator(schema("patients")).iter_errors(dict(row)), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path)
        raise ConfigError(f"{source}: patient {row.get('patient', '?')}: {where + ': ' if where else ''}{e.message}")


def check_unique_patients(patients: Any, source: str) -> None:
    """Refuse a sheet whose pseudonyms repeat (every output path is named by them)."""
    ids = [str(p) for p in patients]
    dup = sorted({p for p in ids if ids.count(p) > 1})
    if dup:
        raise ConfigError(f"{source}: patient pseudonym(s) {dup} appear more than once; each patient needs one row")


def stage_config(config: Mapping[str, Any], *sections: str) -> dict[str, Any]:
    """The sections a stage reads, as a plain dict (what a workflow rule passes to its job)."""
    return {s: copy.deepcopy(config.get(s, {})) for s in sections}
