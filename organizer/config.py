"""Configuration: a TOML file validated by a pydantic schema, with command-line overrides.

Every problem in a config file is reported at once, each with its key path (``clustering.eps``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists one message per problem."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  - {e}" for e in errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    watch: Path | None = Field(None, description="folder to watch for photos")
    output: Path | None = Field(None, description="folder where person folders are written")
    db: Path | None = Field(None, description="SQLite store; default <output>/.organizer/organizer.db")
    known: Path | None = Field(None, description="reference photos, one sub-folder per known person (optional)")


class DetectionConfig(_Section):
    model: Literal["hog", "cnn"] = "hog"
    upsample: int = Field(1, ge=0, le=3)
    max_side: int = Field(1600, ge=64, le=20000)
    max_pixels: int = Field(100_000_000, ge=1)
    min_face_size: int = Field(40, ge=0)
    min_sharpness: float = Field(0.0, ge=0)
    num_jitters: int = Field(1, ge=1, le=100)
    landmarks: Literal["large", "small"] = "large"
    coarse_side: int = Field(800, ge=0, le=20000, description="coarse search frame (HOG, upsample 0); 0 = off")
    fine_below: int = Field(0, ge=0, description="the full search also runs when the coarse one finds a face smaller than this")
    mirror: bool = Field(True, description="encode each face and its mirror image and average the two")
    normalize: bool = Field(True, description="scale encodings to unit length (clustering distances assume it)")
    fallback_margin: float = Field(
        0.5, ge=0, le=2,
        description="photos where HOG finds no face: HOG near-misses down to -this are checked by the CNN detector; 0 = off",
    )


class ClusteringConfig(_Section):
    eps: float = Field(0.36, gt=0, lt=2)
    min_samples: int = Field(3, ge=1)
    doubt_margin: float = Field(0.035, ge=0, lt=2)
    linkage_threshold: float = Field(0.38, ge=0, lt=2, description="average-linkage split of DBSCAN clusters; 0 = off")
    known_k: int = Field(1, ge=1, le=50, description="known people: reference faces that vote on each face")
    known_tolerance: float = Field(
        0.34, gt=0, lt=2, description="known people: a reference face farther than this from a face has no vote")

    def shape(self) -> dict:
        """The settings that shape the clusters (the known-people vote only makes corrections)."""
        return self.model_dump(exclude={"known_k", "known_tolerance"})


class ServiceConfig(_Section):
    settle_seconds: float = Field(2.0, ge=0)
    rescan_interval: float = Field(600.0, ge=0, description="seconds; 0 disables periodic rescans")
    batch_size: int = Field(32, ge=1)
    link_mode: Literal["hardlink", "symlink", "copy"] = "hardlink"
    workers: int = Field(0, ge=0, description="encoder processes; 0 = one per CPU core")
    executor: Literal["local", "dask"] = Field("local", description="where photos are encoded: local processes, or dask")
    scheduler: str | None = Field(None, description="dask scheduler address (tcp://host:8786); none = a local cluster")
    polling: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_forget_share: float = Field(
        0.5, ge=0, le=1,
        description="a scan that would forget more than this share of the known photos at once forgets none",
    )


class WebConfig(_Section):
    host: str = Field("127.0.0.1", description="address the review page listens on (another one is reachable from the network)")
    port: int = Field(8765, ge=0, le=65535)
    # a SecretStr: `organizer config check` and logs show it as stars
    password: SecretStr | None = Field(None, min_length=8, description="guard the page with this password instead of a random token")


class Settings(_Section):
    paths: PathsConfig = PathsConfig()
    detection: DetectionConfig = DetectionConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    service: ServiceConfig = ServiceConfig()
    web: WebConfig = WebConfig()

    @model_validator(mode="after")
    def _paths_apart(self) -> "Settings":
        w, o = self.paths.watch, self.paths.output
        if w is not None and o is not None and Path(w).resolve() == Path(o).resolve():
            raise ValueError("paths.watch and paths.output must be different folders")
        return self

    @property
    def db_path(self) -> Path:
        if self.paths.db is not None:
            return Path(self.paths.db)
        if self.paths.output is None:
            raise ConfigError(["paths.output (or --output / --db) is required to locate the store"])
        return Path(self.paths.output) / ".organizer" / "organizer.db"

    def detection_settings(self):
        from .encode import DetectionSettings

        d = self.detection
        return DetectionSettings(
            model=d.model,
            upsample=d.upsample,
            max_side=d.max_side,
            max_pixels=d.max_pixels,
            coarse_side=d.coarse_side,
            fine_below=d.fine_below,
            num_jitters=d.num_jitters,
            landmarks=d.landmarks,
            fallback_margin=d.fallback_margin,
            mirror=d.mirror,
            normalize=d.normalize,
        )


def _format(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def _validate(data: dict[str, Any], source: str | None) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_format(e) for e in exc.errors()], source) from None


_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def resolve_path(value: str, base: Path, key: str) -> str:
    """A path as the user wrote it -> an absolute one: ``~`` / ``~user`` and ``$VAR`` / ``${VAR}``
    expanded (the shell does not do it in a config file, nor after ``--watch=``), then a relative
    path taken from ``base`` (the config file's folder, or the current folder for flags). Symlinks
    are kept as written. An unset variable or an unknown home is an error, not a literal folder."""
    text = os.path.expanduser(os.path.expandvars(str(value)))
    unset = _VAR.search(text)
    if unset:
        raise ValueError(f"{key}: the environment variable {unset.group(0)} in {value!r} is not set")
    if text.startswith("~"):
        raise ValueError(f"{key}: cannot expand {value!r} (no such user, or HOME is not set)")
    return os.path.abspath(os.path.join(base, text))


def _resolve_paths(data: dict[str, Any], base: Path, keys, source: str | None) -> None:
    paths = data.get("paths")
    if not isinstance(paths, dict):
        return
    errors = []
    for key in keys:
        value = paths.get(key)
        if isinstance(value, str) and value:
            try:
                paths[key] = resolve_path(value, base, f"paths.{key}")
            except ValueError as exc:
                errors.append(str(exc))
    if errors:
        raise ConfigError(errors, source)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read ``path`` (TOML) if given, apply ``overrides`` ({"paths.watch": ...}), validate.

    Paths come out absolute (:func:`resolve_path`): relative ones in the file are taken from the
    file's folder (a service's current folder is ``/``), relative flags from the current folder."""
    data: dict[str, Any] = {}
    source = str(path) if path else None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {path}"], source) from None
        except OSError as exc:
            raise ConfigError([f"cannot read config file: {exc}"], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source) from None
        _resolve_paths(data, Path(os.path.abspath(path)).parent, ("watch", "output", "db", "known"), source)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for dotted, value in flags.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{part}: expected a table"], source)
        node[leaf] = value
    _resolve_paths(data, Path.cwd(), [k.split(".", 1)[1] for k in flags if k.startswith("paths.")], source)
    return _validate(data, source)
