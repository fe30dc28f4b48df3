r"""``cryoavg localsym <function> key=value ...``: RELION ``relion_localsym`` functions.

Keys carry relion_localsym's own flag names (see ``configs/localsym.yaml``), so
RELION commands translate one to one::

    cryoavg localsym search i_map=partall_sums.mrc i_op_mask_info=init_masklist.star \\
        o_mask_info=maskinfo_iter000.star angpix=1.34 ang_step=5
    cryoavg localsym apply angpix=1.34 i_map=unsym.mrc \\
        i_mask_info=mask_and_operators.star o_map=sym.mrc

Functions: ``apply``, ``duplicate``, ``transform``, ``search``, ``refine``, ``scheme``
(global search, local rounds, refinement), ``verify``, ``mask_create``,
``microtubule``, ``txt2rln``. Bad input gives one line on stderr, exit status 2, and no
output file.
"""

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import check_config_types, run_job, torch_device
from cryoavg.errors import ConfigError, InputError
from cryoavg.io.mrc import write_mrc
from cryoavg.localsym.apply import (
    apply_local_symmetry,
    check_operators_in_sphere,
    duplicate_masked_density,
    soft_sphere_3d,
    transform_map,
)
from cryoavg.localsym.io import (
    load_map,
    load_mask,
    load_masks,
    read_mask_info,
    read_mask_list,
    write_candidate_table,
    write_mask_info,
)
from cryoavg.localsym.masks import create_mask, create_mask_denovo
from cryoavg.localsym.microtubule import microtubule_operators
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    operators_to_tensors,
)
from cryoavg.localsym.refine import RefineSettings, refine_operators
from cryoavg.localsym.search import SearchSettings, search_operator
from cryoavg.localsym.verify import format_report, verify_operators

log = logging.getLogger("cryoavg")

FUNCTIONS = (
    "apply",
    "duplicate",
    "transform",
    "search",
    "refine",
    "scheme",
    "verify",
    "mask_create",
    "microtubule",
    "txt2rln",
)


def _require(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        if cfg.get(key) in (None, ""):
            raise ConfigError(
                f"localsym {cfg.function} needs {key}=...: add it to the command line"
            )


def _angpix(cfg: DictConfig) -> float | None:
    return None if cfg.angpix is None else float(cfg.angpix)


def _load_groups(
    cfg: DictConfig, shape: tuple[int, ...], pixel: float
) -> tuple[list[MaskOperators], list[torch.Tensor]]:
    groups = read_mask_info(cfg.i_mask_info)
    notes: list[str] = []
    masks = load_masks(groups, shape, pixel, notes)
    for note in notes:
        log.warning(note)
    if cfg.check_sphere:
        for group, mask in zip(groups, masks, strict=True):
            _check_sphere(group, mask, pixel)
    return groups, masks


def _check_sphere(group: MaskOperators, mask: torch.Tensor, pixel: float) -> None:
    matrices, translations = operators_to_tensors(group.operators, pixel, torch.float64)
    bad = check_operators_in_sphere(mask, matrices, translations)
    if bad and bad[0] == -1:
        raise InputError(
            group.mask_name, "masked region extends beyond the box's maximal sphere"
        )
    if bad:
        raise InputError(
            group.mask_name,
            f"operator {bad[0] + 1} {group.operators[bad[0]].angles_degrees} moves the "
            "masked region out of the box's maximal sphere",
        )


def _write_map(path: str, volume: torch.Tensor, pixel: float) -> None:
    write_mrc(path, volume.float(), pixel)
    log.info("wrote %s", path)


def _run_apply(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_map", "i_mask_info", "o_map")
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    groups, masks = _load_groups(cfg, tuple(volume.shape), pixel)
    operators = [operators_to_tensors(g.operators, pixel) for g in groups]
    result = apply_local_symmetry(volume, masks, operators)
    if cfg.sphere_percentage is not None and float(cfg.sphere_percentage) > 0:
        result = soft_sphere_3d(
            result,
            float(cfg.sphere_percentage),
            float(cfg.width),
            relion_inverted_edge=bool(cfg.relion_inverted_sphere_edge),
        )
    _write_map(cfg.o_map, result, pixel)
    return {
        "n_masks": len(groups),
        "n_operators": sum(len(g.operators) for g in groups),
    }


def _run_duplicate(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_mask_info", "o_map")
    groups = read_mask_info(cfg.i_mask_info)
    volume = None
    if cfg.i_map and Path(cfg.i_map).exists():
        volume, pixel = load_map(cfg.i_map, _angpix(cfg))
        shape = tuple(volume.shape)
    else:
        from cryoavg.io.mrc import read_map_3d

        data, header_pixel = read_map_3d(groups[0].mask_name)
        shape = tuple(data.shape)
        pixel = _angpix(cfg) or header_pixel or 1.0
    notes: list[str] = []
    masks = load_masks(groups, shape, pixel, notes)
    if cfg.check_sphere:
        for group, mask in zip(groups, masks, strict=True):
            _check_sphere(group, mask, pixel)
    operators = [operators_to_tensors(g.operators, pixel) for g in groups]
    _write_map(cfg.o_map, duplicate_masked_density(masks, operators, volume), pixel)
    return {"n_masks": len(groups)}


def _run_transform(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_map", "o_map")
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    operator = LocalSymmetryOperator(
        float(cfg.rot),
        float(cfg.tilt),
        float(cfg.psi),
        (float(cfg.xoff), float(cfg.yoff), float(cfg.zoff)),
    )
    out = transform_map(
        volume, operator.matrix(torch.float32), operator.translation_px(pixel).float()
    )
    _write_map(cfg.o_map, out, pixel)
    return {}


def _search_settings(cfg: DictConfig, global_search: bool) -> SearchSettings:
    settings = SearchSettings(
        ang_range=float(cfg.ang_range),
        ang_rot_range=float(cfg.ang_rot_range),
        ang_tilt_range=float(cfg.ang_tilt_range),
        ang_psi_range=float(cfg.ang_psi_range),
        ang_step=float(cfg.ang_step),
        offset_range=float(cfg.offset_range),
        offset_x_range=float(cfg.offset_x_range),
        offset_y_range=float(cfg.offset_y_range),
        offset_z_range=float(cfg.offset_z_range),
        offset_step=float(cfg.offset_step),
        bin=int(cfg.bin),
        score=str(cfg.score),  # type: ignore[arg-type]
        local_grid=str(cfg.local_grid),  # type: ignore[arg-type]
        global_search=global_search,
        use_healpix=bool(cfg.use_healpix),
        device=str(torch_device(cfg.device)),
        max_samples_per_chunk=int(cfg.max_samples_per_chunk),
    )
    return settings


def _validate_settings(settings: SearchSettings, pixel: float) -> None:
    try:
        settings.validate(pixel)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _refine_settings(cfg: DictConfig) -> RefineSettings:
    return RefineSettings(
        lowpass_nyquist_factors=tuple(float(f) for f in cfg.lowpass_nyquist_factors),
        max_iterations=int(cfg.max_iterations),
        tol_degrees=float(cfg.tol_degrees),
        tol_px=float(cfg.tol_px),
        backend=str(cfg.refine_backend),
        oversample=int(cfg.refine_oversample),
    )


def _global_search(
    cfg: DictConfig,
    volume: torch.Tensor,
    pixel: float,
    settings: SearchSettings,
    tables: dict[str, list[LocalSymmetryOperator]],
) -> tuple[list[MaskOperators], list[torch.Tensor]]:
    areas = read_mask_list(cfg.i_op_mask_info)
    stem = str(Path(cfg.o_mask_info).with_suffix(""))
    groups, reference_masks = [], []
    notes: list[str] = []
    for area_number, area in enumerate(areas, start=1):
        masks = [load_mask(n, volume.shape, pixel, notes) for n in area.mask_names]
        operators = []
        for op_number, target in enumerate(masks[1:], start=1):
            result = search_operator(
                volume,
                masks[0],
                pixel,
                settings,
                target_mask=target,
                max_candidates=int(cfg.max_candidates_written),
            )
            operators.append(result.best)
            tables[f"{stem}_cc_mask{area_number:03d}_op{op_number:03d}.star"] = (
                result.candidates
            )
            log.info(
                "area %d operator %d: %s (score %.5g, %d candidates)",
                area.area_id,
                op_number,
                _describe(result.best),
                result.best.score,
                result.n_candidates,
            )
        groups.append(MaskOperators(area.mask_names[0], operators))
        reference_masks.append(masks[0])
    for note in notes:
        log.warning(note)
    return groups, reference_masks


def _local_search(
    groups: list[MaskOperators],
    masks: list[torch.Tensor],
    volume: torch.Tensor,
    pixel: float,
    settings: SearchSettings,
    stem: str,
    max_candidates: int,
    tables: dict[str, list[LocalSymmetryOperator]] | None,
) -> list[MaskOperators]:
    out = []
    for mask_number, (group, mask) in enumerate(zip(groups, masks, strict=True), 1):
        operators = []
        for op_number, operator in enumerate(group.operators, start=1):
            result = search_operator(
                volume,
                mask,
                pixel,
                settings,
                initial=operator,
                max_candidates=max_candidates,
            )
            operators.append(result.best)
            if tables is not None:
                tables[f"{stem}_cc_mask{mask_number:03d}_op{op_number:03d}.star"] = (
                    result.candidates
                )
        out.append(MaskOperators(group.mask_name, operators))
    return out


def _describe(op: LocalSymmetryOperator) -> str:
    return "rot {:.2f} tilt {:.2f} psi {:.2f}  t ({:.2f}, {:.2f}, {:.2f}) Å".format(
        *op.angles_degrees,
        *op.translation_angstrom,
    )


def _refine_groups(
    cfg: DictConfig,
    groups: list[MaskOperators],
    masks: list[torch.Tensor],
    volume: torch.Tensor,
    pixel: float,
) -> list[MaskOperators]:
    settings = _refine_settings(cfg)
    out = []
    for group, mask in zip(groups, masks, strict=True):
        refined, trace = refine_operators(
            volume, mask, group.operators, pixel, settings
        )
        log.info(
            "refined %d operator(s) of %s: %s L-BFGS steps per stage, converged %s",
            len(refined),
            group.mask_name,
            trace.steps,
            trace.converged,
        )
        out.append(MaskOperators(group.mask_name, refined))
    return out


def _report(
    groups: list[MaskOperators],
    masks: list[torch.Tensor],
    volume: torch.Tensor,
    pixel: float,
    before: list[MaskOperators] | None = None,
) -> str:
    text = []
    for i, (group, mask) in enumerate(zip(groups, masks, strict=True)):
        after = verify_operators(volume, mask, group.operators, pixel, group.mask_name)
        if before is not None:
            first = verify_operators(
                volume, mask, before[i].operators, pixel, group.mask_name
            )
            text.append(format_report(first, after))
        else:
            text.append(format_report(after))
    return "\n".join(text)


def _finish_search(
    cfg: DictConfig,
    groups: list[MaskOperators],
    masks: list[torch.Tensor],
    volume: torch.Tensor,
    pixel: float,
    tables: dict[str, list[LocalSymmetryOperator]],
    before: list[MaskOperators] | None,
) -> dict[str, Any]:
    if cfg.check_sphere:
        for group, mask in zip(groups, masks, strict=True):
            _check_sphere(group, mask, pixel)
    report = _report(groups, masks, volume, pixel, before)
    log.info("per-operator verification:\n%s", report)
    if cfg.write_candidates:
        for path, candidates in tables.items():
            write_candidate_table(path, candidates)
    write_mask_info(cfg.o_mask_info, groups)
    log.info("wrote %s", cfg.o_mask_info)
    return {"groups": groups, "report": report}


def _run_search(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_map", "o_mask_info")
    global_search = bool(cfg.i_op_mask_info)
    if global_search == bool(cfg.i_mask_info):
        raise ConfigError(
            "search needs exactly one of i_mask_info=... (local) or "
            "i_op_mask_info=... (global)"
        )
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    settings = _search_settings(cfg, global_search)
    _validate_settings(settings, pixel)
    tables: dict[str, list[LocalSymmetryOperator]] = {}
    start = time.perf_counter()
    before = None
    if global_search:
        groups, masks = _global_search(cfg, volume, pixel, settings, tables)
    else:
        before, masks = _load_groups(cfg, tuple(volume.shape), pixel)
        stem = str(Path(cfg.o_mask_info).with_suffix(""))
        groups = _local_search(
            before,
            masks,
            volume,
            pixel,
            settings,
            stem,
            int(cfg.max_candidates_written),
            tables,
        )
    if cfg.refine_after_search:
        groups = _refine_groups(cfg, groups, masks, volume, pixel)
    log.info("search took %.1f s", time.perf_counter() - start)
    return _finish_search(cfg, groups, masks, volume, pixel, tables, before)


def _run_refine(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_map", "i_mask_info", "o_mask_info")
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    before, masks = _load_groups(cfg, tuple(volume.shape), pixel)
    start = time.perf_counter()
    groups = _refine_groups(cfg, before, masks, volume, pixel)
    log.info("refinement took %.1f s", time.perf_counter() - start)
    return _finish_search(cfg, groups, masks, volume, pixel, {}, before)


def _run_scheme(cfg: DictConfig) -> dict[str, Any]:
    """Global search at ``scheme_global_step``, local rounds, then refinement."""
    _require(cfg, "i_map", "o_mask_info")
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    start = time.perf_counter()
    tables: dict[str, list[LocalSymmetryOperator]] = {}
    if cfg.i_op_mask_info:
        settings = _search_settings(cfg, True)
        settings.ang_step = float(cfg.scheme_global_step)
        settings.bin = int(cfg.scheme_global_bin)
        _validate_settings(settings, pixel)
        groups, masks = _global_search(cfg, volume, pixel, settings, tables)
    else:
        _require(cfg, "i_mask_info")
        groups, masks = _load_groups(cfg, tuple(volume.shape), pixel)
    initial = groups
    for ang_range, ang_step, offset_px, offset_step_px in cfg.scheme_rounds:
        settings = _search_settings(cfg, False)
        settings.ang_range = float(ang_range)
        settings.ang_step = float(ang_step)
        settings.offset_range = float(offset_px) * pixel
        settings.offset_step = float(offset_step_px) * pixel
        settings.bin = -1
        settings.local_grid = "axis_angle"
        _validate_settings(settings, pixel)
        groups = _local_search(groups, masks, volume, pixel, settings, "", 1, None)
        log.info(
            "local round (%.2f°, %.2f°) done at %.1f s",
            ang_range,
            ang_step,
            time.perf_counter() - start,
        )
    if cfg.scheme_refine:
        groups = _refine_groups(cfg, groups, masks, volume, pixel)
    log.info("scheme took %.1f s", time.perf_counter() - start)
    return _finish_search(cfg, groups, masks, volume, pixel, tables, initial)


def _run_verify(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_map", "i_mask_info")
    volume, pixel = load_map(cfg.i_map, _angpix(cfg))
    groups, masks = _load_groups(cfg, tuple(volume.shape), pixel)
    report = _report(groups, masks, volume, pixel)
    print(report)
    return {"report": report}


def _run_mask_create(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "o_map")
    if cfg.denovo:
        _require(cfg, "box_size")
        mask = create_mask_denovo(
            int(cfg.box_size),
            float(cfg.inner_radius),
            float(cfg.outer_radius),
            float(cfg.width_soft_edge),
            (float(cfg.center_x), float(cfg.center_y), float(cfg.center_z)),
        )
        pixel = _angpix(cfg) or 1.0
    else:
        _require(cfg, "i_map")
        volume, pixel = load_map(cfg.i_map, _angpix(cfg))
        mask = create_mask(
            volume,
            float(cfg.ini_threshold),
            float(cfg.extend_inimask),
            float(cfg.width_soft_edge),
            lowpass_angstrom=float(cfg.lowpass) if cfg.lowpass else None,
            pixel_size_angstrom=pixel,
            invert=bool(cfg.invert),
        )
    if float(mask.max()) <= 0:
        raise InputError(cfg.i_map or "mask", "the mask is empty: lower ini_threshold")
    _write_map(cfg.o_map, mask, pixel)
    return {"fraction": float((mask > 0.5).float().mean())}


def _run_microtubule(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "o_mask_info")
    try:
        operators = microtubule_operators(
            int(cfg.n_protofilaments),
            int(cfg.n_start),
            None if cfg.twist is None else float(cfg.twist),
            None if cfg.rise is None else float(cfg.rise),
            reference_protofilament=(
                None
                if cfg.reference_protofilament is None
                else int(cfg.reference_protofilament)
            ),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    groups = [MaskOperators(str(cfg.mask_name), operators)]
    write_mask_info(cfg.o_mask_info, groups)
    log.info("wrote %d operators to %s", len(operators), cfg.o_mask_info)
    return {"groups": groups}


def _run_txt2rln(cfg: DictConfig) -> dict[str, Any]:
    _require(cfg, "i_mask_info", "o_mask_info")
    groups = read_mask_info(cfg.i_mask_info)
    write_mask_info(cfg.o_mask_info, groups)
    return {"groups": groups}


_RUNNERS = {
    "apply": _run_apply,
    "duplicate": _run_duplicate,
    "transform": _run_transform,
    "search": _run_search,
    "refine": _run_refine,
    "scheme": _run_scheme,
    "verify": _run_verify,
    "mask_create": _run_mask_create,
    "microtubule": _run_microtubule,
    "txt2rln": _run_txt2rln,
}


#: the type of every scalar key (checked first: one clear line for ang_step=abc)
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(
        (
            "width",
            "bin",
            "max_candidates_written",
            "max_samples_per_chunk",
            "max_iterations",
            "refine_oversample",
            "scheme_global_bin",
            "n_protofilaments",
            "n_start",
            "box_size",
            "reference_protofilament",
        ),
        int,
    ),
    **dict.fromkeys(
        (
            "angpix",
            "sphere_percentage",
            "rot",
            "tilt",
            "psi",
            "xoff",
            "yoff",
            "zoff",
            "ang_range",
            "ang_rot_range",
            "ang_tilt_range",
            "ang_psi_range",
            "ang_step",
            "offset_range",
            "offset_x_range",
            "offset_y_range",
            "offset_z_range",
            "offset_step",
            "scheme_global_step",
            "tol_degrees",
            "tol_px",
            "ini_threshold",
            "extend_inimask",
            "width_soft_edge",
            "lowpass",
            "inner_radius",
            "outer_radius",
            "center_x",
            "center_y",
            "center_z",
            "twist",
            "rise",
        ),
        float,
    ),
    **dict.fromkeys(
        (
            "relion_inverted_sphere_edge",
            "use_healpix",
            "write_candidates",
            "refine_after_search",
            "scheme_refine",
            "invert",
            "denovo",
            "check_sphere",
        ),
        bool,
    ),
    **dict.fromkeys(
        (
            "function",
            "i_map",
            "o_map",
            "i_mask_info",
            "i_op_mask_info",
            "o_mask_info",
            "score",
            "local_grid",
            "refine_backend",
            "mask_name",
            "device",
        ),
        str,
    ),
}
OPTIONAL_KEYS = (
    "angpix",
    "box_size",
    "twist",
    "rise",
    "reference_protofilament",
    "i_map",
    "o_map",
    "i_mask_info",
    "i_op_mask_info",
)


def run_localsym(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one local-symmetry function (testable entry point).

    Parameters
    ----------
    cfg
        Composed ``localsym`` config with ``function`` set.

    Returns
    -------
    tuple
        ``(metrics, objects)``: small figures and the function's results.
    """
    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)
    function = str(cfg.function)
    if function not in _RUNNERS:
        raise ConfigError(
            f"unknown localsym function '{function}'; choose from {', '.join(FUNCTIONS)}"
        )
    with torch.no_grad() if function not in ("refine", "scheme", "search") else _null():
        objects = _RUNNERS[function](cfg)
    metrics = {k: v for k, v in objects.items() if isinstance(v, int | float)}
    return metrics, objects


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="localsym")
def _hydra_main(cfg: DictConfig) -> None:
    run_job(run_localsym, cfg)


def main() -> None:
    """Entry point: ``cryoavg localsym <function> key=value ...``."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        function, rest = args[0], args[1:]
        if function not in FUNCTIONS:
            sys.stderr.write(
                f"error: unknown localsym function '{function}'; choose from "
                f"{', '.join(FUNCTIONS)}\n"
            )
            raise SystemExit(2)
        sys.argv = [sys.argv[0], *rest, f"function={function}"]
    _hydra_main()
