"""Validation of the data section beyond field types: sources, mixes, labels, shaping.

Called by `load_config` (collector/config/forms.py); pure Python (no torch, no datasets).
Every problem is one message naming the field as the user spelled it, the bad
value and what is allowed. Local paths are made absolute here (relative to the
config file's directory, then the current directory) so the normalised config
means the same thing wherever the worker runs.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from collector.config.errors import one_error
from collector.config.schema import DatasetEntry
from vaultsh.errors import ConfigError

LOCAL_SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}


def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~")) or path in (".", "..") or Path(path).suffix.lower() in LOCAL_SUFFIXES
    )


def resolve_local(path: str, base_dir: Path | None, force_local: bool) -> tuple[str | None, str | None]:
    """(absolute local path or None for a hub id, error or None)."""
    p = Path(path).expanduser()
    cands = [p] if p.is_absolute() else [b / p for b in ([base_dir] if base_dir else []) + [Path.cwd()]]
    for c in cands:
        if c.exists():
            return str(c.resolve()), None
    if force_local or _looks_local(path):
        return None, f"{path!r}: no such file or directory (looked at: {', '.join(str(c) for c in cands)})"
    return None, None  # a hub dataset id


def check_template(template: str) -> str | None:
    """Why `template` is not a usable format string over record fields, or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"is not a valid format string ({e})"
    names = [f for _, f, _, _ in parsed if f is not None]
    if not names:
        return "names no field (write e.g. 'Instruction: {instruction}')"
    if any(n == "" or n.isdigit() for n in names):
        return "uses positional fields ({} or {0}); name the record's fields, e.g. {instruction}"
    return None


def check_entries(entries: list, where: str, base_dir: Path | None) -> tuple[list[str], list]:
    """Check `datasets` entries; returns (errors, entries with local paths made absolute)."""
    errors: list[str] = []
    out: list = []
    seen: set[str] = set()
    if not entries:
        return [f"{where}: is empty (give at least one dataset)"], out
    for i, e in enumerate(entries):
        at = f"{where}[{i}]"
        if e.name in seen:
            errors.append(f"{at}.name: {e.name!r} is used twice (names must be unique)")
        seen.add(e.name)
        if (e.text_field is None) == (e.text_template is None):
            both = "both" if e.text_field is not None else "neither"
            errors.append(f"{at} ({e.name!r}): give exactly one of text_field or text_template ({both} given)")
        if e.text_template is not None and (why := check_template(e.text_template)):
            errors.append(f"{at}.text_template: {e.text_template!r} {why}")
        local, err = resolve_local(e.path, base_dir, e.format is not None)
        if err:
            errors.append(f"{at}.path: {err}")
        out.append(e.model_copy(update={"path": local}) if local else e)
    return errors, out


def load_mix(path: str, mix: str, label: str, base_dir: Path | None) -> tuple[list[str], str | None, list]:
    """Read a `data_mixes:` file; returns (errors, absolute file path, entries of `mix`)."""
    import yaml
    from pydantic import ValidationError

    local, err = resolve_local(path, base_dir, True)
    if err or local is None:
        return [f"{label}.data_mixes: {err}"], None, []
    try:
        raw = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [f"{label}.data_mixes: {local}: not readable YAML/JSON: {str(e).splitlines()[0]}"], local, []
    mixes = raw.get("data_mixes") if isinstance(raw, dict) else None
    if not isinstance(mixes, dict):
        return [f"{label}.data_mixes: {local}: has no 'data_mixes:' mapping of name -> mix"], local, []
    if mix not in mixes:
        return (
            [f"{label}.mix: {mix!r} is not in {local} (available: {', '.join(map(str, mixes)) or 'none'})"],
            local,
            [],
        )
    body = mixes[mix]
    where = f"{local}: data_mixes.{mix}.datasets"
    if not isinstance(body, dict) or not isinstance(body.get("datasets"), list):
        return [f"{where}: missing (each mix needs a 'datasets:' list)"], local, []
    entries, errors = [], []
    for i, d in enumerate(body["datasets"]):
        try:
            entries.append(DatasetEntry.model_validate(d))
        except ValidationError as e:
            errors += [f"{where}[{i}].{one_error(DatasetEntry, x)}" for x in e.errors()]
    if errors:
        return errors, local, []
    errs, entries = check_entries(entries, where, Path(local).parent)
    return errs, local, entries


# data fields that shape sequences: with reuse the first run already did that, so setting them is a mistake
_NOT_WITH_REUSE = (
    "packing",
    "skip_cache",
    "filter",
    "sample",
    "max_samples",
    "sort_by_length",
    "categories",
    "category_field",
    "label_columns",
    "clean_added_tokens",
    "clean_default_system_prompt",
)


def check_reuse_section(d: Any, label: str, inference: Any) -> list[str]:
    """Config-time checks of `reuse_sequences_from` (no store access)."""
    errors = []
    if getattr(inference, "max_new_tokens", 0) > 0:
        errors.append(
            f"{label}.reuse_sequences_from: cannot be combined with inference.max_new_tokens > 0 "
            "(the stored sequences are fed as they are)"
        )
    defaults = type(d).model_fields
    for name in _NOT_WITH_REUSE:
        f = defaults[name]
        default = f.default_factory() if f.default_factory is not None else f.default
        if getattr(d, name) != default:
            errors.append(
                f"{label}.{name}: does not apply with {label}.reuse_sequences_from "
                "(the sequences and their masks come from that run as stored)"
            )
    return errors


def check_data_section(
    d, label: str, base_dir: Path | None, inference, storage_format: str, datasets_label: str | None = None
):
    """Cross-field checks of the data section; returns (errors, data config with absolute paths).

    `datasets_label` is where the datasets were written when not in the data section
    (the LM-training form's `dataset_config.datasets`)."""
    errors: list[str] = []
    update: dict[str, Any] = {}
    given = [
        n
        for n, v in (
            ("data_key", d.data_key),
            ("datasets", d.datasets),
            ("data_mixes", d.data_mixes),
            ("path", d.path),
            ("reuse_sequences_from", d.reuse_sequences_from),
        )
        if v is not None
    ]
    if d.reuse_sequences_from is not None:
        errors += check_reuse_section(d, label, inference)
        if base_dir is not None and "://" not in d.reuse_sequences_from:
            update["reuse_sequences_from"] = str((base_dir / Path(d.reuse_sequences_from).expanduser()).resolve())
    if not given:
        if d.mix is not None:
            errors.append(f"{label}.mix: {d.mix!r} needs {label}.data_mixes (the file that defines it)")
        else:
            errors.append(
                f"{label}.data_key: required but missing (or give {label}.datasets, "
                f"{label}.data_mixes with {label}.mix, or {label}.path)"
            )
    elif len(given) > 1:
        errors.append(
            f"{label}: give one data source, not {' and '.join(given)} "
            "(data_key, datasets, data_mixes + mix, path, or reuse_sequences_from)"
        )
    if d.datasets is not None:
        errs, entries = check_entries(d.datasets, datasets_label or f"{label}.datasets", base_dir)
        errors += errs
        update["datasets"] = entries
    if d.data_mixes is not None:
        if d.mix is None:
            errors.append(f"{label}.data_mixes: names a file of mixes; pick one with {label}.mix")
        else:
            errs, local, _ = load_mix(d.data_mixes, d.mix, label, base_dir)
            errors += errs
            if local:
                update["data_mixes"] = local
    elif d.mix is not None and given:
        errors.append(f"{label}.mix: {d.mix!r} needs {label}.data_mixes (the file that defines it)")
    path_only = ("subset", "text_field", "text_template")
    if d.path is not None:
        if d.text_field is not None and d.text_template is not None:
            errors.append(f"{label}: give at most one of text_field or text_template")
        if d.text_template is not None and (why := check_template(d.text_template)):
            errors.append(f"{label}.text_template: {d.text_template!r} {why}")
        local, err = resolve_local(d.path, base_dir, False)
        if err:
            errors.append(f"{label}.path: {err}")
        elif local:
            update["path"] = local
    else:
        for f in path_only:
            if getattr(d, f) is not None:
                errors.append(f"{label}.{f}: only applies with {label}.path (datasets entries have their own {f})")
    if d.filter is not None:
        from collector.shaping import parse_filter

        try:
            parse_filter(d.filter)
        except ConfigError as e:
            errors.append(f"{label}.filter: {d.filter!r} {e}")
    if d.reversed and not d.sort_by_length:
        errors.append(f"{label}.reversed: true needs {label}.sort_by_length: true (reversed = longest first)")
    labelled = (
        d.path is not None
        or bool(d.categories)
        or d.category_balance_strategy == "equalize"
        or d.category_field is not None
        or bool(d.label_columns)
    )
    if len(set(d.label_columns)) != len(d.label_columns):
        errors.append(f"{label}.label_columns: {d.label_columns!r} names a column twice")
    for c in d.label_columns:
        if not c.strip() or "/" in c:
            errors.append(f"{label}.label_columns: {c!r} is not a usable label name")
    generating = inference.max_new_tokens > 0
    if d.packing:
        if d.skip_cache:
            errors.append(f"{label}.packing: true cannot be combined with skip_cache (packing splits long documents)")
        if labelled:
            errors.append(
                f"{label}.packing: true cannot carry per-sequence labels (categories, label_columns, path): "
                "a packed row holds several documents"
            )
        if generating:
            errors.append(f"{label}.packing: true cannot be combined with inference.max_new_tokens > 0")
    if generating and inference.max_new_tokens >= d.seq_length:
        errors.append(
            f"inference.max_new_tokens: {inference.max_new_tokens} leaves no room for the prompt "
            f"(must be < {label}.seq_length = {d.seq_length})"
        )
    if storage_format == "pt" and (labelled or (generating and inference.save_activations)):
        what = "generation labels" if not labelled else "labels (categories, label_columns, path)"
        errors.append(f"storage.format: 'pt' cannot store {what}; use safetensors")
    if not inference.save_activations and not generating:
        errors.append(
            "inference.save_activations: false only makes sense with inference.max_new_tokens > 0 "
            "(it stores the generated text only)"
        )
    return errors, (d.model_copy(update=update) if update else d)
