"""The node's one typed settings object: a TOML file with environment overrides.

Built once at start-up (by the CLI) with :func:`load_settings` and passed down; nothing reads
settings at import time. Precedence, highest first: constructor arguments, environment
variables ``DIPNODE_<SECTION>__<KEY>`` (lists and tables as JSON, e.g.
``DIPNODE_NODE__ALLOWED_CALLING_AETS='["PACS","SCANNER1"]'``), the TOML file, defaults.
Sections are merged key by key, so one environment variable overrides one key of the file.

Every value is validated before the node starts; a bad one raises :class:`SettingsError`
naming the key (``node.port``), what was expected and what was given. Unknown keys are
errors too, so that a misspelt key cannot silently fall back to a default.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dipnode.dicom_io.tls import check_cert_and_key
from dipnode.dicom_io.vr import check_ae_title
from dipnode.models.params import PRESETS, DipParams, Method, resolve_params

__all__ = [
    "Destination", "HttpSettings", "MatchingSettings", "RetentionSettings", "MethodSettings", "NodeSettings", "OutputSettings",
    "RetrieveSettings", "SenderSettings", "SeriesSettings", "Source", "Settings", "SettingsError", "StorageSettings",
    "WorkersSettings", "example_settings_toml", "load_settings",
]


class SettingsError(ValueError):
    """The configuration is unusable; the message names each bad key, expected and actual."""


class _Section(BaseModel):
    # Frozen: settings are a hand-off, read by many threads. Forbid extras: catch typos.
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSettings(_Section):
    """The storage SCP: who we are, where we listen and whom we accept."""

    ae_title: str = "DIPNODE"
    host: str = "127.0.0.1"  # loopback by default: listening on a hospital network is a decision
    port: int = Field(11112, ge=0, le=65535)  # 0: the OS picks a free port (demo, tests)
    # Required, no default: accepting any caller must be written down as ["*"]. An empty list
    # rejects every association (a node that is configured but closed).
    allowed_calling_aets: list[str]
    allowed_addresses: list[str] = []  # IP addresses or CIDR networks; empty = any address
    max_associations: int = Field(10, ge=1)
    # One address (a PACS, a scanner, or a peer gone wrong) holds at most this many connections
    # at once, so it cannot take every slot; capped at max_associations.
    max_associations_per_address: int = Field(5, ge=1)
    # PS3.8 Annex D.3.3.2: 0 means "no limit"; pynetdicom's default is 16382.
    max_pdu: int = Field(16382, ge=0, le=2**32 - 1)
    idle_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    # PS3.8 9.1.5 ARTIM: a connection that has not sent its A-ASSOCIATE-RQ within this time is
    # closed (every toolkit sends it at once; the timer only frees slots held by silent peers).
    request_timeout_s: float = Field(5.0, gt=0, le=120, allow_inf_nan=False)
    # Larger instances are refused (INSTANCE_TOO_LARGE, also once inflated or decoded): the node
    # takes classic single-frame brain PET/MR slices (<= 4 MiB even at 1024x1024x32 bits); the
    # limit bounds receive memory at max_associations x about twice this (bench/RELIABILITY.md).
    max_instance_mb: int = Field(64, ge=1, le=4096)
    accept_compressed: bool = True  # offer JPEG/JPEG 2000/JPEG-LS/RLE transfer syntaxes too
    # PS3.15 B.1 (Basic TLS Secure Transport Connection Profile): set cert and key to listen
    # with TLS only; tls_ca verifies client certificates, required when tls_require_client_cert.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, v: int) -> int:
        # PS3.8 D.1: 0 (no limit) or room for the PDV header; pynetdicom refuses less than 4096.
        if v != 0 and v < 4096:
            raise ValueError(f"expected 0 (no limit) or >= 4096, got {v}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> "NodeSettings":
        check_cert_and_key(self.tls_cert, self.tls_key)
        if self.tls_require_client_cert and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError(
                "tls_require_client_cert: expected tls_cert, tls_key and tls_ca to be set, got "
                f"tls_cert={self.tls_cert!r}, tls_ca={self.tls_ca!r}"
            )
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError(f"tls_ca: expected only with tls_cert and tls_key, got {self.tls_ca!r}")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title("ae_title", v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _calling(cls, v: list[str]) -> list[str]:
        if "*" in v and len(v) > 1:
            raise ValueError(f'expected either ["*"] (any caller) or a list of AE titles, got {v!r}')
        return v if v == ["*"] else [check_ae_title("allowed_calling_aets item", a) for a in v]

    @field_validator("allowed_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ValueError(f"expected IP addresses or CIDR networks, got {a!r}") from None
        return v

    def accepts_any_caller(self) -> bool:
        return self.allowed_calling_aets == ["*"]


class StorageSettings(_Section):
    spool_dir: Path = Path("/var/lib/dipnode/spool")
    database: Path = Path("/var/lib/dipnode/dipnode.sqlite")
    # Below this free space the SCP answers "out of resources" rather than half-write a file.
    min_free_mb: int = Field(1024, ge=0)


class RetentionSettings(_Section):
    """What the node deletes and when (node/retention.py). Ages count from when the last job
    using a series finished (or, for a series no job used, from its last instance)."""

    enabled: bool = True
    inputs_days: float = Field(7.0, gt=0, allow_inf_nan=False)  # received files of done jobs
    failed_days: float = Field(30.0, gt=0, allow_inf_nan=False)  # ... of failed jobs: look, re-run
    outputs_days: float = Field(7.0, gt=0, allow_inf_nan=False)  # results kept on disk, thumbnails
    sweep_interval_s: float = Field(3600.0, ge=10, allow_inf_nan=False)
    # Below this much free space the oldest finished inputs and results go at once, whatever
    # their age, before [storage] min_free_mb refuses stores. None: twice min_free_mb.
    emergency_free_mb: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "RetentionSettings":
        if self.failed_days < self.inputs_days:
            raise ValueError(f"failed_days: expected >= inputs_days ({self.inputs_days:g}), got {self.failed_days:g}")
        return self


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class HttpSettings(_Section):
    """The status page, /metrics and /healthz (node/http.py)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback: only this host sees it; anything else needs a token
    port: int = Field(8480, ge=0, le=65535)  # 0: the OS picks (tests)
    # Required when host is not loopback: Authorization: Bearer <token>, or the basic-auth password.
    token: str | None = Field(None, min_length=16)
    # Set to allow re-run and re-send from the page (/admin, basic-auth password); else read-only.
    admin_token: str | None = Field(None, min_length=16)
    refresh_s: int = Field(15, ge=2, le=3600)

    @model_validator(mode="after")
    def _access(self) -> "HttpSettings":
        if self.enabled and self.host not in _LOOPBACK and not self.token:
            raise ValueError(f"token: expected a token of 16 or more characters when host is not loopback "
                             f"(the status page and metrics would be open to the network), got none for "
                             f"host {self.host!r}")
        if self.token is not None and self.token == self.admin_token:
            raise ValueError("admin_token: expected a token other than token (readers would be administrators), "
                             "got the same")
        return self


class SeriesSettings(_Section):
    stable_age_s: float = Field(30.0, gt=0)
    check_interval_s: float = Field(2.0, gt=0)


DEFAULT_MR_PATTERNS = [r"T1", r"MP-?RAGE", r"SPGR", r"BRAVO", r"3D"]
# Series that are never the prior, by Series Description (case-insensitive, searched):
# localizers and scouts, diffusion and its maps, reformats and projections. "(?<![a-z])"
# and "(?![a-z])" keep short words whole where "_" joins them (ep2d_diff_b0_1000_tra_ADC),
# so "mpr" does not hit "mprage".
DEFAULT_MR_EXCLUDE_PATTERNS = [
    r"locali[sz]er", r"scout", r"survey", r"(?<![a-z])loc(?![a-z])", r"3[ _-]?plane",
    r"tri[ _-]?pilot", r"aahead", r"(?<![a-z])dwi(?![a-z])", r"diff", r"(?<![a-z])adc(?![a-z])",
    r"trace", r"(?<![a-z])dti(?![a-z])", r"tensor", r"(?<![a-z])mpr(?![a-z])", r"reformat",
    r"(?<![a-z])mip(?![a-z])", r"(?<![a-z])sub(?![a-z])",
]
# Image Type (0008,0008, PS3.3 C.7.6.1.1.2) values that exclude a series: value 1 DERIVED and
# value 2 SECONDARY (not acquired as such); vendor value 3+ terms for localizers, diffusion and
# its maps, reformats, projections, phase images and mosaics (several slices in one image).
DEFAULT_MR_EXCLUDE_IMAGE_TYPES = [
    "DERIVED", "SECONDARY", "LOCALIZER", "SCOUT", "DIFFUSION", "ADC", "TRACEW", "FA", "MPR",
    "MIP", "PROJECTION IMAGE", "REFORMATTED", "PHASE", "P", "MOSAIC",
]


def _regexes(v: list[str]) -> list[str]:
    for p in v:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"expected regular expressions, got {p!r} ({e})") from None
    return v


class MatchingSettings(_Section):
    mr_wait_s: float = Field(600.0, ge=0)
    date_window_days: int = Field(30, ge=0)
    # Case-insensitive regular expressions searched in Series Description (0008,103E): rank only.
    mr_description_patterns: list[str] = DEFAULT_MR_PATTERNS
    require_3d: bool = False  # only MR Acquisition Type (0018,0023) "3D" is eligible
    fallback: Literal["gaussian", "fail"] = "gaussian"
    # After the first MR series of an exam arrives, wait this long for a better-ranked series
    # of the same exam before taking the best complete one (a PACS sends an exam series by series).
    mr_grace_s: float = Field(60.0, ge=0)
    # Never the prior: Series Description patterns (case-insensitive regexes) and Image Type values.
    mr_exclude_patterns: list[str] = DEFAULT_MR_EXCLUDE_PATTERNS
    mr_exclude_image_types: list[str] = DEFAULT_MR_EXCLUDE_IMAGE_TYPES

    @field_validator("mr_description_patterns", "mr_exclude_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return _regexes(v)

    @field_validator("mr_exclude_image_types")
    @classmethod
    def _image_types(cls, v: list[str]) -> list[str]:
        # CS values (PS3.5 6.2): upper case, at most 16 characters, no backslash.
        out = [t.strip().upper() for t in v]
        bad = [t for t in out if not t or len(t) > 16 or "\\" in t]
        if bad:
            raise ValueError(f"expected Image Type values (1-16 characters, no backslash), got {bad!r}")
        return out


class _Peer(_Section):
    """A DICOM peer: AE title, host, port, and whether to use TLS with it (None: [sender] tls
    decides; the certificates are [sender]'s)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title("ae_title", v)

    @property
    def label(self) -> str:
        """``AET@HOST:PORT``: how the log names it, and the key a delivery is stored under."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class Source(_Peer):
    """A PACS the node may query (C-FIND) and retrieve prior MR series from (C-MOVE or C-GET)."""

    # "move": C-MOVE, the PACS sends the series to move_destination (it must know that AE
    # title's host and port); "get": C-GET, the series comes back on our own association.
    retrieve: Literal["move", "get"] = "move"
    move_destination: str | None = None  # None: [node] ae_title

    @field_validator("move_destination")
    @classmethod
    def _dest(cls, v: str | None) -> str | None:
        return None if v is None else check_ae_title("move_destination", v)


class RetrieveSettings(_Section):
    """When and how hard to fetch a prior MR from [[sources]]."""

    # A complete PET with no eligible MR at hand (none received, none arriving) waits this long
    # before the sources are queried: a routed MR may still be on its way.
    query_delay_s: float = Field(60.0, ge=0)
    # A failed query or retrieval (source down, C-MOVE refused or partial) is retried this many
    # times with exponential backoff; then the job falls back (or fails) with the reason.
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(30.0, ge=0)
    backoff_max_s: float = Field(600.0, ge=0)
    timeout_s: float = Field(60.0, gt=0)  # network, association and DIMSE timeouts

    @model_validator(mode="after")
    def _order(self) -> "RetrieveSettings":
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_max_s: expected >= backoff_s ({self.backoff_s}), got {self.backoff_max_s}")
        return self


class MethodSettings(_Section):
    """The method and its parameters: a preset, with any key given here overriding it."""

    name: Method = Method.SDIP
    preset: str = "paper"
    alpha: float | None = None
    epochs: int | None = None
    sample_from: int | None = None
    sample_every: int | None = None
    fwhm_voxels: float | None = None
    seed: int | None = None
    device: str | None = None
    # The L-BFGS schedule and the fit's speed switches (models/params.py DipParams).
    max_iter: int | None = None
    history_size: int | None = None
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    cudnn_benchmark: bool | None = None

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"expected one of {sorted(PRESETS)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _params_valid(self) -> "MethodSettings":
        # The combination must make valid DipParams; its keys are this section's, so the
        # message names them as the user wrote them ("fwhm_voxels", not "DipParams.fwhm_voxels").
        try:
            self.dip_params()
        except ValueError as exc:
            raise ValueError(str(exc).replace("DipParams.", "").removeprefix("DipParams: ")) from None
        return self

    def dip_params(self) -> DipParams:
        """The preset with this section's overrides, by models.params.resolve_params (the
        rules: epochs moves m to epochs // 2 unless sample_from is set; cdip forces alpha 0)."""
        overrides = {k: getattr(self, k) for k in
                     ("alpha", "epochs", "sample_from", "sample_every", "fwhm_voxels", "seed", "device",
                       "max_iter", "history_size", "precision", "channels_last", "compile",
                       "cudnn_benchmark")}
        return resolve_params(preset_name=self.preset, overrides=overrides, method=self.name)


class OutputSettings(_Section):
    # Series Number (0020,0011) is VR IS (PS3.5 §6.2): up to 2^31 - 1. 0 or unset: not written.
    series_number_pet: int | None = Field(1001, ge=0, le=2**31 - 1)
    series_number_map: int | None = Field(1002, ge=0, le=2**31 - 1)
    series_number_map_plain: int | None = Field(1003, ge=0, le=2**31 - 1)
    # The data weight w (SDIP: how much of the measured value each voxel kept).
    series_number_weight: int | None = Field(1004, ge=0, le=2**31 - 1)
    series_number_weight_plain: int | None = Field(1005, ge=0, le=2**31 - 1)
    # The first word of every output's Series Description; routing rules (deploy/orthanc-route.lua)
    # match it so that outputs are not routed back. <= 32 leaves room in LO's 64 characters.
    description_prefix: str = Field("dipnode", max_length=32)
    research: bool = True  # label outputs as research until someone clears the device

    @field_validator("series_number_pet", "series_number_map", "series_number_map_plain",
                     "series_number_weight", "series_number_weight_plain")
    @classmethod
    def _zero_is_none(cls, v: int | None) -> int | None:
        return v or None

    @model_validator(mode="after")
    def _distinct(self) -> "OutputSettings":
        numbers = [n for n in (self.series_number_pet, self.series_number_map, self.series_number_map_plain,
                               self.series_number_weight, self.series_number_weight_plain) if n]
        if len(numbers) != len(set(numbers)):
            raise ValueError(f"series numbers: expected distinct values, got {numbers!r}")
        if not self.series_number_pet:
            raise ValueError("series_number_pet: expected a number >= 1 (the denoised PET is always written), got None")
        return self


class Destination(_Peer):
    """A PACS or workstation the results are sent to (C-STORE)."""


class SenderSettings(_Section):
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(300.0, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    calling_ae: str | None = None  # None: the node's own AE title (see Settings.calling_ae)
    # TLS for sending (PS3.15 B.1): tls is the default for every destination (a destination's
    # own tls overrides it); tls_ca verifies the peer (None: the system's CAs); tls_cert and
    # tls_key are our client certificate for peers that require one.
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("calling_ae")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else check_ae_title("ae_title", v)

    @model_validator(mode="after")
    def _order(self) -> "SenderSettings":
        check_cert_and_key(self.tls_cert, self.tls_key)
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(
                f"backoff_max_s: expected >= backoff_s ({self.backoff_s}), got {self.backoff_max_s}"
            )
        return self


class WorkersSettings(_Section):
    # Jobs computing at once: with the local executor one per GPU of this host; with "ray" the
    # jobs in flight on the cluster (about its number of GPU workers; Ray queues the rest).
    max_concurrent_jobs: int = Field(1, ge=1)
    device: str = "auto"  # used when [method] device is unset
    # Each job's fit refuses to start when its estimated peak memory exceeds this (MiB; 0: no
    # limit beyond the device's own): with several jobs per GPU, about the GPU's memory over
    # max_concurrent_jobs.
    memory_limit_mb: int = Field(0, ge=0)
    # A fit out of memory (the device's allocator, or memory_limit_mb): "fail" the job with
    # the reason, run it again on the "cpu", or fall back to the "gaussian" filter.
    on_oom: Literal["fail", "cpu", "gaussian"] = "fail"
    # Where a job's alignment and fit run (node/jobs/executor.py): "local", threads of this process;
    # "ray", tasks on a Ray cluster (pip install 'dipnode[ray]'). Reading series, the database
    # and writing and sending DICOM stay in the node either way.
    executor: Literal["local", "ray"] = "local"
    # The Ray head's GCS address "host:port" (its `ray start --head --port`); required for "ray".
    # The node drives the cluster as a Ray driver, so this host must run a Ray node of the
    # cluster (deploy/compose.yaml: a zero-resource `ray start` in the node's container).
    ray_address: str | None = None
    ray_node_ip: str | None = None  # this host's address in the cluster; None: Ray's guess
    # What one job asks the cluster for: gpus_per_job of gpu_resource ("GPU": Ray's GPUs, set
    # on each worker by `ray start --num-gpus`; any other name is a custom resource, e.g. a
    # stand-in for GPUs in tests) and cpus_per_job CPUs.
    gpus_per_job: float = Field(1.0, ge=0)
    gpu_resource: str = Field("GPU", min_length=1, max_length=64)
    cpus_per_job: float = Field(1.0, ge=0)
    # A job whose worker died (process killed, machine lost) runs again this many times (Ray
    # task retries); then it fails with that reason. Errors of the job itself are not retried.
    ray_retries: int = Field(2, ge=0)
    # The cluster unreachable (at start or lost mid-job): "wait" keeps jobs queued and
    # reconnects every ray_connect_timeout_s; "fail" fails them with the reason. The node keeps
    # receiving either way.
    ray_unreachable: Literal["wait", "fail"] = "wait"
    ray_connect_timeout_s: float = Field(30.0, gt=0)

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected the Ray head's GCS address as 'host:port', got {v!r}")
        return v

    @field_validator("gpu_resource")
    @classmethod
    def _resource(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", v) or v == "CPU":
            raise ValueError(f"expected a Ray resource name ('GPU' or a custom name), got {v!r}")
        return v

    @model_validator(mode="after")
    def _ray(self) -> "WorkersSettings":
        if self.executor == "ray" and self.ray_address is None:
            raise ValueError("ray_address: expected the Ray head's 'host:port' with executor = \"ray\", got None")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v)):
            raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")
        return v


# The parsed TOML for the Settings being built on this thread/task (see load_settings).
_toml_data: ContextVar[dict[str, Any] | None] = ContextVar("_toml_data", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DIPNODE_", env_nested_delimiter="__", extra="forbid", frozen=True,
    )

    node: NodeSettings
    storage: StorageSettings = StorageSettings()
    series: SeriesSettings = SeriesSettings()
    matching: MatchingSettings = MatchingSettings()
    method: MethodSettings = MethodSettings()
    output: OutputSettings = OutputSettings()
    destinations: list[Destination] = []
    sender: SenderSettings = SenderSettings()
    sources: list[Source] = []
    retrieve: RetrieveSettings = RetrieveSettings()
    workers: WorkersSettings = WorkersSettings()
    retention: RetentionSettings = RetentionSettings()
    http: HttpSettings = HttpSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        data = _toml_data.get()
        if data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    @model_validator(mode="after")
    def _unique_destinations(self) -> "Settings":
        labels = [d.label for d in self.destinations]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"destinations: expected distinct AET@HOST:PORT entries, got duplicates {dupes!r}")
        sources = [x.label for x in self.sources]
        dupes = sorted({x for x in sources if sources.count(x) > 1})
        if dupes:
            raise ValueError(f"sources: expected distinct AET@HOST:PORT entries, got duplicates {dupes!r}")
        return self

    @model_validator(mode="after")
    def _emergency_mark(self) -> "Settings":
        mark = self.retention.emergency_free_mb
        if mark is not None and mark <= self.storage.min_free_mb:
            raise ValueError(f"retention.emergency_free_mb: expected more than storage.min_free_mb "
                             f"({self.storage.min_free_mb}, where stores are refused), got {mark}")
        return self

    @property
    def emergency_free_mb(self) -> int:
        """The free-space mark of the emergency sweep: [retention] emergency_free_mb, else
        twice [storage] min_free_mb (at least 1 MB)."""
        return self.retention.emergency_free_mb or max(2 * self.storage.min_free_mb, 1)

    @property
    def calling_ae(self) -> str:
        """The AE title the sender calls from: [sender] calling_ae, else [node] ae_title."""
        return self.sender.calling_ae or self.node.ae_title

    def dip_params(self) -> DipParams:
        """The method's parameters; the device falls back to [workers] device."""
        params = self.method.dip_params().replace(memory_limit_mb=self.workers.memory_limit_mb)
        return params if self.method.device is not None else params.replace(device=self.workers.device)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(settings)"
        msg = e["msg"].removeprefix("Value error, ")
        # pydantic says "Input should be ..."; keep one wording: "expected ...; got ...".
        if msg.startswith("Input should be "):
            msg = "expected " + msg.removeprefix("Input should be ")
        if e["type"] == "missing":
            lines.append(f"  {key}: expected a value, got none (required)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {key}: expected no such key (unknown setting), got {e['input']!r}")
        elif re.match(r"^\w+(, \w+)*: .*, got ", msg):
            # A section's own check that names its keys and values ("fwhm_voxels: expected
            # a number >= 0, got -1.0"): the key path, and no second "got" with the whole section.
            field, rest = msg.split(": ", 1)
            lines.append(f"  {key}.{field}: {rest}" if "," not in field else f"  {key}: {msg}")
        else:
            lines.append(f"  {key}: {msg}; got {e.get('input')!r}")
    return f"invalid settings ({origin}):\n" + "\n".join(lines)


def load_settings(path: Path | None) -> Settings:
    """Settings from the TOML file at ``path`` (None: environment and defaults only).

    Raises SettingsError for a missing or malformed file and for every invalid value.
    """
    data: dict[str, Any] | None = None
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"settings file: expected an existing TOML file, got {str(path)!r}") from None
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"settings file {str(path)!r}: expected valid TOML, got: {e}") from None
    origin = f"file {str(path)!r} + DIPNODE_* environment" if path else "DIPNODE_* environment"
    token = _toml_data.set(data)
    try:
        return Settings()
    except ValidationError as e:
        raise SettingsError(_format_errors(e, origin)) from None
    finally:
        _toml_data.reset(token)


def example_settings_toml() -> str:
    """The shipped example configuration (deploy/dipnode.example.toml), every key commented."""
    here = Path(__file__).resolve().parent.parent / "deploy" / "dipnode.example.toml"
    return here.read_text(encoding="utf-8")
