"""Which images train with which options: sd-scripts' dataset discovery over a file listing.

PURE and torch/PIL-free: the service's preflight runs it on an S3 listing before anything is
launched, and the trainer runs it again on the fetched folder. Three ways to describe a dataset,
as in sd-scripts:
- folder mode: `<repeats>_<concept>` subfolders of the dataset root (`10_shiina mayuri`); the
  concept name is the caption of images without a caption file; other subfolders are ignored with
  a warning;
- explicit `spec.dataset.subsets` (Lathe's JSON form of the same thing);
- sd-scripts' dataset TOML in `spec.dataset.config_toml` (`[general]`, `[[datasets]]`,
  `[[datasets.subsets]]`; a subset's value wins over its dataset's, which wins over `[general]`,
  which wins over the spec's `dataset.*` fields, which play the role of sd-scripts' command line).
Regularisation images come from `reg_files` in folder layout (`is_reg`); their repeats are
stretched as sd-scripts does so that they balance the training images (`balanced_repeats`).
All paths are relative POSIX paths below the dataset (or reg) root.
"""

from __future__ import annotations

import posixpath
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from trainer.core.dataset.buckets import BucketParams
from trainer.core.dataset.captions import CaptionOptions
from trainer.core.failures import JobFailure, Reason
from trainer.core.images import IMAGE_EXTENSIONS

# Side files other tools leave in dataset folders: not images, not worth a warning.
_IGNORED_NAMES = {"metadata_cache.json", "thumbs.db", "desktop.ini"}
_IGNORED_EXTENSIONS = (".npz",)  # sd-scripts' latent / text-encoder caches

Root = Literal["train", "reg"]


@dataclass(frozen=True)
class ImageEntry:
    path: str  # relative to the subset's root (dataset root or reg root)
    caption_path: str | None  # same stem + caption extension, when that file exists


@dataclass(frozen=True)
class DatasetParams:
    """One `[[datasets]]` table (or the spec's dataset): geometry and batch size of its buckets."""

    buckets: BucketParams
    batch_size: int | None = None  # None: training.batch_size


@dataclass(frozen=True)
class Subset:
    name: str  # folder name, as sd-scripts records it in ss_dataset_dirs / ss_tag_frequency
    image_dir: str  # relative to the root ("" is the root itself)
    num_repeats: int
    is_reg: bool
    class_tokens: str | None  # caption of images without a caption file (None: empty caption)
    caption_extension: str
    caption: CaptionOptions
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    root: Root = "train"
    dataset: int = 0  # index into DatasetLayout.datasets
    images: list[ImageEntry] = field(default_factory=list)


@dataclass
class DatasetLayout:
    subsets: list[Subset]
    unpaired_captions: list[str]  # caption files with no image of the same stem
    unsupported: list[str]  # files in subset folders that are neither images nor captions
    warnings: list[str]
    datasets: list[DatasetParams] = field(default_factory=list)

    @property
    def image_steps_per_epoch(self) -> int:
        """Σ images × repeats over the training subsets (sd-scripts' num_train_images)."""
        return sum(len(s.images) * s.num_repeats for s in self.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Σ reg images × repeats before balancing (sd-scripts' num_reg_images)."""
        return sum(len(s.images) * s.num_repeats for s in self.subsets if s.is_reg)

    @property
    def num_images(self) -> int:
        return sum(len(s.images) for s in self.subsets)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """sd-scripts' `ss_dataset_dirs`: folder name → {n_repeats, img_count}."""
        return {s.name: {"n_repeats": s.num_repeats, "img_count": len(s.images)} for s in self.subsets}


# ---------------------------------------------------------------------------------------------
# Entry point


def discover_layout(spec: Any, files: list[str], reg_files: list[str] | None = None) -> DatasetLayout:
    """The dataset layout of `spec` (a JobSpec) over `files` (and `reg_files`), relative POSIX paths.

    Raises JobFailure(dataset_invalid) when no training image is found, and
    JobFailure(spec_invalid) for a bad `dataset.config_toml`."""
    ds = spec.dataset
    warnings: list[str] = []
    index = _FolderIndex(files, warnings, "dataset")
    mode, configs, datasets, reg_configs = _subset_configs(ds, files, reg_files, warnings)
    reg_index = _FolderIndex(reg_files or [], warnings, "reg dataset") if reg_configs else None
    subsets, unpaired, unsupported = _scan_subsets(configs + reg_configs, index, reg_index, warnings)
    if unpaired:
        warnings.append(f"{len(unpaired)} caption file(s) have no image of the same name (e.g. '{unpaired[0]}'); "
                        "they are not used")
    if unsupported:
        warnings.append(f"{len(unsupported)} file(s) are neither images ({', '.join(IMAGE_EXTENSIONS)}) nor caption "
                        f"files and are skipped (e.g. '{unsupported[0]}')")

    if not any(not s.is_reg for s in subsets):
        raise JobFailure(Reason.DATASET_INVALID, _no_images_message(mode, ds, configs, index))
    return DatasetLayout(subsets, unpaired, unsupported, warnings, datasets)


def _subset_configs(ds: Any, files: list[str], reg_files: list[str] | None, warnings: list[str],
                    ) -> tuple[str, list[_SubsetConfig], list[DatasetParams], list[_SubsetConfig]]:
    """(mode, training subset configs, datasets, reg subset configs) by the way the dataset is described."""
    default_params = DatasetParams(BucketParams.from_spec(ds))
    if ds.config_toml is not None:
        configs, datasets = _subsets_from_toml(ds.config_toml, ds)
        if reg_files:
            warnings.append("dataset.reg_uri is ignored because dataset.config_toml is given (as sd-scripts ignores "
                            "--reg_data_dir with --dataset_config); declare regularisation subsets with is_reg = true")
        return "dataset.config_toml", configs, datasets, []
    if ds.subsets is not None:
        mode, configs = "dataset.subsets", [_subset_from_spec(i, s, ds) for i, s in enumerate(ds.subsets)]
    else:
        mode, configs = "folder", _subsets_from_folders(files, ds, "train", warnings)
    reg_configs = _subsets_from_folders(reg_files, ds, "reg", warnings) if reg_files else []
    return mode, configs, [default_params], reg_configs


def _scan_subsets(configs: list[_SubsetConfig], index: _FolderIndex, reg_index: _FolderIndex | None,
                  warnings: list[str]) -> tuple[list[Subset], list[str], list[str]]:
    """Each subset's images, skipping (with a warning) subsets without repeats, duplicates and empty
    folders; plus the unpaired captions and unsupported files found."""
    subsets: list[Subset] = []
    unpaired: list[str] = []
    unsupported: list[str] = []
    seen: set[tuple[str, str, int]] = set()
    for cfg in configs:
        idx = index if cfg.subset.root == "train" else reg_index
        assert idx is not None
        sub = cfg.subset
        key = (sub.root, sub.image_dir, sub.dataset)
        if sub.num_repeats < 1:
            warnings.append(f"{cfg.where}: folder '{_shown(sub.image_dir)}' ignored: num_repeats is {sub.num_repeats}"
                            + (" (from dataset.dataset_repeats)" if cfg.repeats_from_spec else ""))
            continue
        if key in seen:
            warnings.append(f"{cfg.where}: folder '{_shown(sub.image_dir)}' is already a subset of this dataset; "
                            "the first one is used (as in sd-scripts)")
            continue
        seen.add(key)
        images, u_captions, u_files = idx.scan(sub.image_dir, sub.caption_extension)
        unpaired += u_captions
        unsupported += u_files
        if not images:
            if not idx.has_dir(sub.image_dir):
                warnings.append(f"{cfg.where}: folder '{_shown(sub.image_dir)}' not found in the {sub.root} files; "
                                "subset ignored")
            else:
                warnings.append(f"{cfg.where}: folder '{_shown(sub.image_dir)}' has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); subset ignored")
            continue
        missing = sum(1 for im in images if im.caption_path is None)
        if missing and sub.class_tokens is None:
            warnings.append(f"{cfg.where}: {missing} image(s) in '{_shown(sub.image_dir)}' have no "
                            f"'{sub.caption_extension}' caption file and the subset has no class_tokens: they train "
                            "with an empty caption")
        subsets.append(replace(sub, images=images))
    return subsets, unpaired, unsupported


def balanced_repeats(subsets: list[Subset]) -> list[list[int]]:
    """Repeats per image, aligned with `subsets[i].images`.

    Training images repeat `num_repeats` times. Regularisation images are spread as sd-scripts
    does, per dataset: walk the reg images in order, each adding its subset's repeats, until the
    training image-steps are matched (later reg images are then unused: 0); if one pass is not
    enough, keep walking and add one repeat per image until they are. Pass subsets whose
    unreadable images were removed to balance what will really train."""
    out = [[s.num_repeats if not s.is_reg else 0] * len(s.images) for s in subsets]
    for dataset in sorted({s.dataset for s in subsets}):
        train_steps = sum(s.num_repeats * len(s.images) for s in subsets if s.dataset == dataset and not s.is_reg)
        reg_slots = [(i, j) for i, s in enumerate(subsets) if s.dataset == dataset and s.is_reg
                     for j in range(len(s.images))]
        if not reg_slots or train_steps == 0:
            continue
        filled, first_pass = 0, True
        while filled < train_steps:
            for i, j in reg_slots:
                if first_pass:
                    out[i][j] = subsets[i].num_repeats
                    filled += subsets[i].num_repeats
                else:
                    out[i][j] += 1
                    filled += 1
                if filled >= train_steps:
                    break
            first_pass = False
    return out


def image_id(root: Root, path: str) -> str:
    """The id of one image across the train and reg roots ("train:10_x/a.png")."""
    return f"{root}:{path}"


# ---------------------------------------------------------------------------------------------
# File listing


def _shown(image_dir: str) -> str:
    return image_dir or "."


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


class _FolderIndex:
    """Files of a listing grouped by folder (direct children only, as sd-scripts globs)."""

    def __init__(self, files: Iterable[str], warnings: list[str], what: str) -> None:
        self.by_dir: dict[str, list[str]] = {}
        self.dirs: set[str] = set()
        bad: list[str] = []
        for raw in files:
            if raw.endswith("/"):
                continue  # folder markers in object-store listings
            path = raw.replace("\\", "/")
            norm = posixpath.normpath(path)
            if norm.startswith("/") or norm == ".." or norm.startswith("../"):
                bad.append(raw)
                continue
            if _is_hidden(norm):
                continue
            folder, name = posixpath.split(norm)
            self.by_dir.setdefault(folder, []).append(name)
            while folder:
                self.dirs.add(folder)
                folder = posixpath.dirname(folder)
        for names in self.by_dir.values():
            names.sort()
        if bad:
            warnings.append(f"{len(bad)} {what} path(s) outside the root are ignored (e.g. '{bad[0]}')")

    def has_dir(self, folder: str) -> bool:
        return folder == "" or folder in self.dirs

    def top_level_dirs(self) -> list[str]:
        return sorted(d for d in self.dirs if "/" not in d)

    def scan(self, folder: str, caption_ext: str) -> tuple[list[ImageEntry], list[str], list[str]]:
        """(images with their caption files, unpaired caption files, unsupported files) of one folder."""
        names = self.by_dir.get(folder, [])
        join = (lambda n: posixpath.join(folder, n)) if folder else (lambda n: n)
        name_set = set(names)
        cap_ext = caption_ext.lower()
        images: list[ImageEntry] = []
        used_captions: set[str] = set()
        captions: list[str] = []
        unsupported: list[str] = []
        for name in names:
            lower = name.lower()
            if lower.endswith(IMAGE_EXTENSIONS):
                cap = _caption_for(name, caption_ext, name_set)
                if cap is not None:
                    used_captions.add(cap)
                images.append(ImageEntry(join(name), join(cap) if cap else None))
            elif cap_ext and lower.endswith(cap_ext):
                captions.append(name)
            elif lower in _IGNORED_NAMES or lower.endswith(_IGNORED_EXTENSIONS):
                continue
            else:
                unsupported.append(join(name))
        unpaired = [join(c) for c in captions if c not in used_captions]
        return images, unpaired, unsupported


def _caption_for(image_name: str, caption_ext: str, names: set[str]) -> str | None:
    stem = posixpath.splitext(image_name)[0]
    candidates = [stem + caption_ext]
    tokens = stem.split("_")
    if len(tokens) >= 5:  # sd-scripts' face-crop naming: "name_cx_cy_w_h.png" may share "name.txt"
        candidates.append("_".join(tokens[:-4]) + caption_ext)
    for cand in candidates:
        if cand in names:
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# Subset configurations


@dataclass
class _SubsetConfig:
    subset: Subset
    where: str  # for messages: "folder mode", "dataset.subsets[2]", "[[datasets]] #1 [[datasets.subsets]] #2"
    repeats_from_spec: bool = False


def _dot(ext: str) -> str:
    return ext if not ext or ext.startswith(".") else "." + ext


def _caption_options(get) -> CaptionOptions:
    return CaptionOptions(
        shuffle=bool(get("shuffle_caption")),
        separator=get("caption_separator"),
        keep_tokens=int(get("keep_tokens")),
        keep_tokens_separator=get("keep_tokens_separator") or None,
        secondary_separator=get("secondary_separator") or None,
        enable_wildcard=bool(get("enable_wildcard")),
        prefix=get("caption_prefix") or None,
        suffix=get("caption_suffix") or None,
        dropout_rate=float(get("caption_dropout_rate")),
        dropout_every_n_epochs=int(get("caption_dropout_every_n_epochs")),
        tag_dropout_rate=float(get("caption_tag_dropout_rate")),
    )


def _spec_defaults(ds: Any) -> dict[str, Any]:
    """The spec's dataset fields in the role of sd-scripts' command-line values (the last fallback)."""
    return {
        "num_repeats": ds.dataset_repeats,
        "shuffle_caption": ds.shuffle_caption,
        "caption_separator": ds.caption_separator,
        "keep_tokens": ds.keep_tokens,
        "keep_tokens_separator": None,
        "secondary_separator": None,
        "enable_wildcard": False,
        "caption_prefix": None,
        "caption_suffix": None,
        "color_aug": ds.color_aug,
        "flip_aug": ds.flip_aug,
        "random_crop": ds.random_crop,
        "caption_dropout_rate": ds.caption_dropout_rate,
        "caption_dropout_every_n_epochs": ds.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": ds.caption_tag_dropout_rate,
        "caption_extension": ds.caption_extension,
        "class_tokens": None,
        "is_reg": False,
        "resolution": ds.resolution,
        "enable_bucket": ds.enable_bucket,
        "min_bucket_reso": ds.min_bucket_reso,
        "max_bucket_reso": ds.max_bucket_reso,
        "bucket_reso_steps": ds.bucket_reso_steps,
        "bucket_no_upscale": ds.bucket_no_upscale,
        "batch_size": None,
    }


def _lookup(*tables: dict[str, Any]):
    """sd-scripts' fallback search: the first table holding a non-None value wins."""

    def get(key: str) -> Any:
        for table in tables:
            value = table.get(key)
            if value is not None:
                return value
        return None

    return get


def _make_subset(get, *, image_dir: str, name: str, root: Root, dataset: int) -> Subset:
    return Subset(
        name=name,
        image_dir=image_dir,
        num_repeats=int(get("num_repeats")),
        is_reg=bool(get("is_reg")) or root == "reg",
        class_tokens=get("class_tokens"),
        caption_extension=_dot(get("caption_extension")),
        caption=_caption_options(get),
        flip_aug=bool(get("flip_aug")),
        color_aug=bool(get("color_aug")),
        random_crop=bool(get("random_crop")),
        root=root,
        dataset=dataset,
    )


def _subsets_from_folders(files: list[str] | None, ds: Any, root: Root, warnings: list[str]) -> list[_SubsetConfig]:
    index = _FolderIndex(files or [], [], root)
    defaults = _spec_defaults(ds)
    out: list[_SubsetConfig] = []
    ignored: list[str] = []
    nested: set[str] = set()
    where = "reg folder" if root == "reg" else "dataset folder"
    for folder in index.top_level_dirs():
        prefix, _, concept = folder.partition("_")
        if not prefix.isdigit():
            ignored.append(folder)
            continue
        local = {"num_repeats": int(prefix), "class_tokens": concept, "is_reg": root == "reg"}
        sub = _make_subset(_lookup(local, defaults), image_dir=folder, name=folder, root=root, dataset=0)
        out.append(_SubsetConfig(sub, f"{where} '{folder}'"))
        nested.update(d for d in index.dirs if d.startswith(folder + "/"))
    if ignored:
        warnings.append(f"{where}s without a '<repeats>_' prefix are ignored: "
                        + ", ".join(f"'{d}'" for d in ignored[:5]) + (" …" if len(ignored) > 5 else "")
                        + " (name them like '10_concept' to train them)")
    if nested:
        warnings.append(f"sub-folders inside concept folders are not read (sd-scripts reads only the files directly "
                        f"in a '<repeats>_<concept>' folder): " + ", ".join(f"'{d}'" for d in sorted(nested)[:5]))
    root_images = [n for n in index.by_dir.get("", []) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if root_images:
        warnings.append(f"{len(root_images)} image(s) at the top of the {root} dataset are ignored: put them in a "
                        "'<repeats>_<concept>' folder, e.g. '10_mychar/'")
    return out


def spec_problems(ds: Any) -> list[tuple[str, str]]:
    """(field path, message) for what `dataset.config_toml` and `dataset.subsets[].image_dir` (of a
    DatasetSpec) get wrong on their own: the checks `discover_layout` starts with, which need no file
    listing, so the spec check runs them at submit even where the dataset cannot be listed then."""
    out: list[tuple[str, str]] = []
    if ds.config_toml is not None:
        try:
            _subsets_from_toml(ds.config_toml, ds)
        except JobFailure as exc:
            out.append(("dataset.config_toml", exc.message))
    for i, sub in enumerate(ds.subsets or []):
        field_name = f"dataset.subsets[{i}].image_dir"
        try:
            _clean_dir(sub.image_dir, field_name)
        except JobFailure as exc:
            out.append((field_name, exc.message))
    return [(path, message.removeprefix(f"{path}: ")) for path, message in out]


def _subset_from_spec(i: int, sub: Any, ds: Any) -> _SubsetConfig:
    image_dir = _clean_dir(sub.image_dir, f"dataset.subsets[{i}].image_dir")
    local = {name: getattr(sub, name) for name in sub.__struct_fields__}
    built = _make_subset(_lookup(local, _spec_defaults(ds)), image_dir=image_dir,
                         name=posixpath.basename(image_dir) or ".", root="train", dataset=0)
    return _SubsetConfig(built, f"dataset.subsets[{i}]")


def _clean_dir(image_dir: str, field_name: str) -> str:
    norm = posixpath.normpath(image_dir.replace("\\", "/")) if image_dir else "."
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "://" in image_dir:
        raise JobFailure(Reason.SPEC_INVALID, f"{field_name}: '{image_dir}' must be a folder inside the dataset "
                         "(a relative path such as '10_mychar')")
    return "" if norm == "." else norm


# ---------------------------------------------------------------------------------------------
# sd-scripts dataset TOML

_SUBSET_KEYS: dict[str, str] = {  # allowed in [general], [[datasets]] and [[datasets.subsets]]
    "num_repeats": "int", "shuffle_caption": "bool", "caption_separator": "str", "keep_tokens": "int",
    "keep_tokens_separator": "str", "secondary_separator": "str", "enable_wildcard": "bool",
    "color_aug": "bool", "flip_aug": "bool", "random_crop": "bool", "caption_prefix": "str",
    "caption_suffix": "str", "caption_dropout_rate": "float", "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float", "caption_extension": "str", "class_tokens": "str",
}
_DATASET_KEYS: dict[str, str] = {  # allowed in [general] and [[datasets]]
    "batch_size": "int", "bucket_no_upscale": "bool", "bucket_reso_steps": "int", "enable_bucket": "bool",
    "max_bucket_reso": "int", "min_bucket_reso": "int", "resolution": "reso",
}
_SUBSET_ONLY_KEYS: dict[str, str] = {"image_dir": "str", "is_reg": "bool"}
# sd-scripts options Lathe does not implement: accepted only at sd-scripts' default value.
_UNSUPPORTED_KEYS: dict[str, Any] = {
    "face_crop_aug_range": None, "token_warmup_min": 1, "token_warmup_step": 0, "network_multiplier": 1.0,
    "alpha_mask": False, "metadata_file": None, "conditioning_data_dir": None, "resize_interpolation": None,
}
_IGNORED_KEYS = {"cache_info"}  # a local speed-up of sd-scripts; meaningless here


def _subsets_from_toml(text: str, ds: Any) -> tuple[list[_SubsetConfig], list[DatasetParams]]:
    field_name = "dataset.config_toml"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobFailure(Reason.SPEC_INVALID, f"{field_name}: not valid TOML: {exc}") from None
    problems: list[str] = []
    for key in doc:
        if key not in ("general", "datasets"):
            problems.append(f"unknown top-level key '{key}'; sd-scripts' dataset config has [general] and [[datasets]]")
    general = doc.get("general", {})
    if not isinstance(general, dict):
        problems.append("[general] must be a table")
        general = {}
    _check_table(general, "[general]", {**_DATASET_KEYS, **_SUBSET_KEYS}, problems)
    datasets_raw = doc.get("datasets", [])
    if not isinstance(datasets_raw, list) or not all(isinstance(d, dict) for d in datasets_raw):
        problems.append("datasets must be an array of tables ([[datasets]])")
        datasets_raw = []
    if not datasets_raw and not problems:
        problems.append("no [[datasets]] table: add at least one with a [[datasets.subsets]] image_dir")

    defaults = _spec_defaults(ds)
    configs: list[_SubsetConfig] = []
    params: list[DatasetParams] = []
    for d, dataset in enumerate(datasets_raw):
        dwhere = f"[[datasets]] #{d + 1}"
        _check_table(dataset, dwhere, {**_DATASET_KEYS, **_SUBSET_KEYS, "subsets": "subsets"}, problems)
        subsets_raw = dataset.get("subsets", [])
        if not isinstance(subsets_raw, list) or not all(isinstance(s, dict) for s in subsets_raw):
            problems.append(f"{dwhere}: subsets must be an array of tables ([[datasets.subsets]])")
            subsets_raw = []
        if not subsets_raw:
            problems.append(f"{dwhere}: no [[datasets.subsets]]; add one with image_dir")
        get_d = _lookup(dataset, general, defaults)
        params.append(_dataset_params(get_d, dwhere, problems))
        for s, subset in enumerate(subsets_raw):
            swhere = f"{dwhere} [[datasets.subsets]] #{s + 1}"
            built = _toml_subset(subset, (subset, dataset, general, defaults), d, swhere, problems)
            if built is not None:
                configs.append(built)
    if problems:
        raise JobFailure(Reason.SPEC_INVALID, f"{field_name}: " + "; ".join(problems))
    return configs, params


def _toml_subset(subset: dict[str, Any], tables: tuple[dict[str, Any], ...], dataset: int, where: str,
                 problems: list[str]) -> _SubsetConfig | None:
    """One [[datasets.subsets]] table; its values fall back through `tables` (subset, dataset,
    [general], the spec's defaults). None, with the problems noted, when it is not usable."""
    _check_table(subset, where, {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}, problems)
    if "image_dir" not in subset:
        problems.append(f"{where}: image_dir is required (a folder relative to the dataset root)")
        return None
    if not isinstance(subset["image_dir"], str):
        return None  # reported by _check_table
    try:
        image_dir = _clean_dir(subset["image_dir"], f"{where}: image_dir")
    except JobFailure as exc:
        problems.append(exc.message)
        return None
    repeats_from_spec = all(t.get("num_repeats") is None for t in tables[:3])
    try:
        built = _make_subset(_lookup(*tables), image_dir=image_dir, name=posixpath.basename(image_dir) or ".",
                             root="train", dataset=dataset)
    except (TypeError, ValueError, AttributeError) as exc:  # a wrong type already reported by _check_table
        problems.append(f"{where}: {exc}")
        return None
    return _SubsetConfig(built, where, repeats_from_spec)


def _dataset_params(get, where: str, problems: list[str]) -> DatasetParams:
    reso = get("resolution")
    wh = (reso, reso) if isinstance(reso, int) else tuple(reso) if isinstance(reso, list) and len(reso) == 2 else None
    if wh is None:
        problems.append(f"{where}: resolution must be an integer or [width, height]")
        wh = (512, 512)
    try:
        bp = BucketParams(
            resolution=(int(wh[0]), int(wh[1])),
            enable_bucket=bool(get("enable_bucket")),
            min_reso=int(get("min_bucket_reso")),
            max_reso=int(get("max_bucket_reso")),
            steps=int(get("bucket_reso_steps")),
            no_upscale=bool(get("bucket_no_upscale")),
        )
    except (TypeError, ValueError):
        # A wrong type, already reported by _check_table: int("abc") raises here too, and must end as
        # a dataset problem, not an internal error.
        problems.append(f"{where}: the bucket settings must be integers and booleans")
        return DatasetParams(BucketParams())
    if bp.enable_bucket:
        if min(bp.resolution) < bp.min_reso:
            problems.append(f"{where}: min_bucket_reso {bp.min_reso} is above the resolution {bp.resolution}; lower it")
        if max(bp.resolution) > bp.max_reso:
            problems.append(f"{where}: max_bucket_reso {bp.max_reso} is below the resolution {bp.resolution}; raise it")
        if bp.steps < 1:
            problems.append(f"{where}: bucket_reso_steps must be ≥ 1")
    batch = get("batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        problems.append(f"{where}: batch_size must be ≥ 1")
        batch = None
    return DatasetParams(bp, batch)


_TYPE_NAMES = {"int": "an integer", "bool": "true or false", "str": "a string", "float": "a number",
               "reso": "an integer or [width, height]", "subsets": "an array of tables"}


def _check_table(table: dict[str, Any], where: str, allowed: dict[str, str], problems: list[str]) -> None:
    for key, value in table.items():
        if key in _IGNORED_KEYS:
            continue
        if key in _UNSUPPORTED_KEYS:
            if value != _UNSUPPORTED_KEYS[key]:
                problems.append(f"{where}: '{key}' is an sd-scripts option Lathe does not support; remove it")
            continue
        kind = allowed.get(key)
        if kind is None:
            problems.append(f"{where}: unknown key '{key}'; allowed here: {', '.join(sorted(allowed))}")
        elif not _type_ok(kind, value):
            problems.append(f"{where}: '{key}' must be {_TYPE_NAMES[kind]}, got {value!r}")
        elif kind in ("int", "float") and value < 0:
            problems.append(f"{where}: '{key}' must not be negative, got {value!r}")
        elif key.endswith("_rate") and value > 1:
            problems.append(f"{where}: '{key}' is a probability between 0 and 1, got {value!r}")


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "reso":
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        return ok(value) or (isinstance(value, list) and len(value) == 2 and all(ok(v) for v in value))
    return True  # "subsets": checked by the caller


def _no_images_message(mode: str, ds: Any, configs: list[_SubsetConfig], index: _FolderIndex) -> str:
    uri = ds.uri
    if mode == "folder":
        tops = index.top_level_dirs()
        if not tops:
            return (f"no training images in {uri}: expected '<repeats>_<concept>' folders (e.g. '10_mychar/') holding "
                    f"{', '.join(IMAGE_EXTENSIONS)} images")
        return (f"no training images in {uri}: none of its folders ({', '.join(tops[:5])}) is a '<repeats>_<concept>' "
                f"folder holding {', '.join(IMAGE_EXTENSIONS)} images")
    dirs = ", ".join(f"'{_shown(c.subset.image_dir)}'" for c in configs if not c.subset.is_reg) or "none"
    return (f"no training images in {uri}: the training subsets of {mode} ({dirs}) hold no "
            f"{', '.join(IMAGE_EXTENSIONS)} images")
