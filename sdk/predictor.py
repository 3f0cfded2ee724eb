"""Inference for many users from **one** ONNX Runtime session per bundle.

The bundle's inference model exposes each trainable tensor as an overridable input, so
a user's delta is applied by feeding ``base + delta`` at run time: switching users never
rebuilds a session. Decoded deltas are cached (LRU). In a per-row bundle, one batch can
mix users: each row gets its own bias (``[rows, d]`` inputs) in one forward pass.

Example:
    >>> from bitfit.sdk import Predictor
    >>> predictor = Predictor("bundles/minilm-sentiment", store="~/.local/share/bitfit")   # doctest: +SKIP
    >>> predictor.predict(["great flight!", "lost my bag"], user=["alice", None]).labels     # doctest: +SKIP
    ['positive', 'negative']
    >>> Predictor("bundles/minilm-sentiment", store=False).predict(["great flight!"]).labels  # doctest: +SKIP
    ['positive']
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .bundle import Bundle
from .data import SCORING_TOKENS, TextEncoder, as_feature_dict, check_feature_arrays, check_text, length_groups
from .delta import Delta, check_delta_fits
from .errors import BitfitError, DeltaNotFoundError, InvalidArgumentError, InvalidUserDataError
from .options import (
    DEFAULT_PROVIDERS, DEFAULT_VERIFY, Providers, Verify, check_choice, check_providers, check_threads, open_store,
    set_threads,
)
from .population import check_population_name, load_population
from .population import offsets as population_offsets
from .runtime import ort, resolve_providers
from .store import DeltaStore

log = logging.getLogger("bitfit.sdk")

GraphOptimization = Literal["disabled", "basic", "extended", "all"]
BadDeltaPolicy = Literal["fallback", "raise"]
_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# Chosen by measurement (benchmarks/run.py, BENCHMARKS.md): with the biases overridable,
# "all" and "basic" ran within noise of each other on ORT 1.19.2; "all" is never slower.
DEFAULT_GRAPH_OPTIMIZATION: GraphOptimization = "all"


@dataclass
class Prediction:
    """Model outputs for a batch: logits, probabilities and (for classifiers) label names.

    ``fallbacks`` lists the users whose delta could not be used (corrupt, for another
    base) and who were served the base model instead. ``labels`` holds label names (or
    indices) for classifiers, lists of names for multi-label bundles and numbers for
    regression.

    Example:
        >>> out = Predictor("bundles/minilm-sentiment").predict(["great flight!"])     # doctest: +SKIP
        >>> out.labels, out.probabilities.shape, out.fallbacks                          # doctest: +SKIP
        (['positive'], (1, 3), {})
    """

    logits: np.ndarray
    probabilities: np.ndarray
    labels: list[Any]
    users: list[str | None]
    fallbacks: dict[str, str] = field(default_factory=dict)


class Predictor:
    """One inference session per bundle; any user's delta applied per call or per row.

    The options mean what they mean in :class:`~bitfit.sdk.personalizer.Personalizer`
    (``bitfit.sdk.options``), so a Predictor built with the same arguments serves the
    deltas that Personalizer saved.

    Args:
        bundle: a bundle directory (or an opened Bundle).
        store: where deltas live: a path, a DeltaStore, or None (default) for the platform's
            data directory, as in Personalizer (a user's delta is found without naming the
            store twice); False for no store: only the base model is served and asking for
            a user is an InvalidArgumentError.
        providers: where inference runs: "cpu" (default), "cuda", "auto" (CUDA where this
            onnxruntime has it) or a list of execution providers (CPU always appended).
        strict_providers: refuse (ProviderUnavailableError) a listed provider this build
            lacks instead of warning and dropping it.
        verify: how the bundle's files are checked on opening: "hashes" (default), "sizes"
            (a fast start: the MiniLM bundle is ~90 MB to hash) or "none". A file already
            hashed by this process and unchanged since is not hashed again (``bitfit.sdk.file_facts``).
        batch_size: at most this many rows per onnxruntime run in ``predict`` (default 64).
            Text runs in groups of rows of similar length, each within ``SCORING_TOKENS``
            (512) padded tokens, and the outputs come back in the inputs' order.
        threads: onnxruntime's intra-op threads: an int, or None / 0 (default): onnxruntime's
            default, one per core (inference batches are large and the session lives long,
            so its thread pool pays off even for a small model).
        key: AES key of an encrypted store (see docs/security.md).
        on_bad_delta: "fallback" serves the base model for a user whose delta is corrupt or
            for another base (reported in ``Prediction.fallbacks``); "raise" raises.
        population: the name of a population delta in the store (``bitfit.sdk.population``):
            users without a delta are served base + its current version, and each user's
            delta is applied on the population version it was trained on. None (default): no
            population.

    Example:
        >>> Predictor("bundles/tiny", providers="gpu")          # doctest: +SKIP
        Traceback (most recent call last):
        ...
        bitfit.sdk.errors.InvalidArgumentError: providers must be 'cpu', 'cuda', 'auto', ...
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        store: DeltaStore | str | os.PathLike | Literal[False] | None = None,
        *,
        providers: Providers = DEFAULT_PROVIDERS,
        strict_providers: bool = False,
        graph_optimization: GraphOptimization = DEFAULT_GRAPH_OPTIMIZATION,
        threads: int | None = None,
        cache_size: int = 256,
        on_bad_delta: BadDeltaPolicy = "fallback",
        batch_size: int = 64,
        key: bytes | None = None,
        verify: Verify = DEFAULT_VERIFY,
        population: str | None = None,
    ) -> None:
        check_choice("verify", verify, ("hashes", "sizes", "none"))
        self.population = check_population_name(population)
        check_choice("graph_optimization", graph_optimization, tuple(_LEVELS))
        check_choice("on_bad_delta", on_bad_delta, ("fallback", "raise"))
        providers = check_providers(providers)
        for name, value, low in (("batch_size", batch_size, 1), ("cache_size", cache_size, 0)):
            if type(value) is not int or value < low:
                raise InvalidArgumentError(f"{name} must be an int >= {low}, got {value!r}")
        check_threads(threads)
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=verify)
        self.manifest = self.bundle.manifest
        self.store = open_store(store, key, allow_none=True)
        if self.population is not None and self.store is None:
            raise InvalidArgumentError("population= needs a store to load it from; store=False has none")
        options = ort.SessionOptions()
        options.graph_optimization_level = _LEVELS[graph_optimization]
        set_threads(options, threads or 0)  # None: onnxruntime's default (a long-lived session: its pool starts once)
        self.providers = resolve_providers(providers, strict=strict_providers)
        self.session = ort.InferenceSession(str(self.bundle.file("inference_model")), options, providers=self.providers)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        missing = [t.name for t in self.manifest.trainable if t.name not in overridable]
        if missing:
            from .errors import BundleInvalidError

            raise BundleInvalidError(f"the inference model does not expose {missing[:3]} as overridable inputs; re-export the bundle")
        # The manifest names the feeds and the output to fetch; a damaged one would fail inside ORT.
        graph_inputs = {i.name for i in self.session.get_inputs()} - overridable
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if {i.name for i in self.manifest.inputs} != graph_inputs or self.manifest.logits_output not in graph_outputs:
            from .errors import BundleInvalidError

            raise BundleInvalidError(
                f"manifest.json names inputs {[i.name for i in self.manifest.inputs]} and output "
                f"{self.manifest.logits_output!r}, the inference model has {sorted(graph_inputs)} and {sorted(graph_outputs)}: "
                "the bundle was altered; copy or re-export it"
            )
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in overridable]
        self.encoder = TextEncoder(self.bundle) if self.manifest.text else None
        self.base = {t.name: v.reshape(t.inference_shape) for t, v in zip(self.manifest.trainable, self.bundle.trainable_base().values())}
        self.on_bad_delta = on_bad_delta
        self.batch_size = batch_size
        self._cache: OrderedDict[str, tuple[Any, dict[str, np.ndarray], str | None]] = OrderedDict()
        self._cache_size = cache_size
        self._head_paths: dict[str, str] = {}
        # The current population's tensors, read once per version (its HEAD's signature), not
        # once per user without a delta.
        self._population_cache: tuple[Any, dict[str, np.ndarray]] | None = None
        # predict() may run on several threads while personalize() invalidates entries:
        # the cache (an OrderedDict) is only touched under this lock.
        self._lock = threading.Lock()

    # -- deltas ---------------------------------------------------------------------
    def _store_signature(self, user: str) -> Any:
        """What identifies the user's current delta on disk: HEAD's stat (one syscall).

        Another process may save a new version at any time; a changed HEAD (new inode
        after its atomic rename) invalidates the cached tensors.
        """
        if self.store is None:
            return None
        head = self._head_paths.get(user)
        if head is None:
            if len(self._head_paths) > 4 * self._cache_size:
                self._head_paths.clear()  # bounded memory with millions of users
            head = self._head_paths[user] = str(self.store.path_for(user) / "HEAD")
        try:
            stat = os.stat(head)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def user_tensors(self, user: str | None, fallbacks: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        """The trainable tensors to feed for ``user`` (base + delta), cached; {} for the base.

        A user served the base model because their delta is unusable is added to
        ``fallbacks`` (on every call, not only the one that loaded it).

        Example:
            >>> predictor.user_tensors(None)                                   # doctest: +SKIP
            {}
            >>> sorted(predictor.user_tensors("alice"))[:2]                    # doctest: +SKIP
            ['/encoder/layer.0/attention/output/dense/Add_bias', '/encoder/layer.0/attention/self/key/Add_bias']
        """
        if user is None:
            return {}
        signature = (self._store_signature(user),
                     self._store_signature(self.population) if self.population is not None else None)
        with self._lock:
            cached = self._cache.get(user)
        if cached is None or cached[0] != signature:
            cached = (signature, *self._load_user(user))  # disk I/O outside the lock
        with self._lock:
            self._cache[user] = cached
            self._cache.move_to_end(user)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if cached[2] is not None and fallbacks is not None:
            fallbacks[user] = cached[2]
        return cached[1]

    def _load_user(self, user: str) -> tuple[dict[str, np.ndarray], str | None]:
        """The user's tensors, and why the base model is served instead (None if it is not)."""
        if self.store is None:
            raise InvalidArgumentError(
                f"user {user!r:.60} was asked for, but this predictor has no delta store (store=False): pass user=None "
                "for the base model, or create it with store=<path> (None: the platform's data directory)"
            )
        try:
            delta = self.store.load(user)
            check_delta_fits(delta, base_fingerprint=self.manifest.base_fingerprint, shapes=self.manifest.trainable_shapes)
            return self._tensors_for_offsets(population_offsets(delta, self.store, self.manifest)), None
        except DeltaNotFoundError:
            return self._population_tensors(), None  # not personalized yet: the base (+ the population)
        except BitfitError as err:
            if self.on_bad_delta == "raise":
                raise
            served = "the base model" if self.population is None else f"the current population {self.population!r}"
            log.warning("user %r: delta unusable (%s); serving %s", user, err, served)
            return self._population_tensors(), f"{type(err).__name__}: {err}"

    def _population_tensors(self) -> dict[str, np.ndarray]:
        """base + the current population delta ({} = the base, without a population or with none stored)."""
        if self.population is None:
            return {}
        signature = self._store_signature(self.population)
        cached = self._population_cache
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            delta, _ = load_population(self.store, self.population, self.manifest)
            tensors = self._tensors_for_offsets(delta.tensors)
        except DeltaNotFoundError:
            tensors = {}
        self._population_cache = (signature, tensors)  # one tuple assignment: safe across threads
        return tensors

    def _tensors_for_offsets(self, offsets: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: (self.base[t.name] + np.asarray(offsets[t.name]).reshape(t.inference_shape)).astype(np.float32)
                for t in self.manifest.trainable}

    def tensors_for_delta(self, delta: Delta) -> dict[str, np.ndarray]:
        """base + delta for each trainable tensor, in the inference model's shapes.

        Example:
            >>> feeds = predictor.tensors_for_delta(store.load("alice"))        # doctest: +SKIP
        """
        return self._tensors_for_offsets(delta.tensors)

    def invalidate(self, user: str | None = None) -> None:
        """Forget cached deltas (one user, or all).

        Example:
            >>> predictor.invalidate("alice")                                  # doctest: +SKIP
        """
        with self._lock:
            if user is None:
                self._cache.clear()
            else:
                self._cache.pop(user, None)
            if user is None or user == self.population:
                self._population_cache = None

    # -- inputs ---------------------------------------------------------------------
    def encode(self, inputs: Any) -> tuple[dict[str, np.ndarray], int]:
        """Model feeds and row count from texts (text bundles), a dict of arrays, or one array
        (a one-input numeric bundle).

        Example:
            >>> feeds, rows = predictor.encode(np.zeros((2, 4), np.float32))   # doctest: +SKIP
            >>> list(feeds), rows                                              # doctest: +SKIP
            (['x'], 2)
        """
        if self.encoder is not None and not isinstance(inputs, Mapping):
            if isinstance(inputs, (str, bytes)):
                inputs = [inputs]
            try:
                inputs = list(inputs)
            except TypeError as err:
                raise InvalidUserDataError(f"predict takes texts for this bundle (a str or a list of str), got {type(inputs).__name__}") from err
            texts = [check_text(t, f"input {i}") for i, t in enumerate(inputs)]
            if not texts:
                raise InvalidUserDataError("predict needs at least one input")
            return self.encoder.feeds_for_texts(texts), len(texts)
        inputs = as_feature_dict(inputs, self.manifest)  # a bare array for a one-input bundle
        arrays = check_feature_arrays(inputs, self.manifest, vocab_size=self.encoder.vocab_size if self.encoder else None)
        rows = next(iter(arrays.values())).shape[0]
        if rows == 0:
            raise InvalidUserDataError("predict needs at least one input row")
        return arrays, rows

    # -- running --------------------------------------------------------------------
    def logits(self, feeds: Mapping[str, np.ndarray], users: Sequence[str | None],
               fallbacks: dict[str, str] | None = None) -> np.ndarray:
        """Raw first output for already-encoded feeds; ``users`` has one entry per row.

        Example:
            >>> feeds, rows = predictor.encode(["great", "awful"])             # doctest: +SKIP
            >>> predictor.logits(feeds, ["alice", "bob"]).shape                # doctest: +SKIP
            (2, 3)
        """
        distinct = list(dict.fromkeys(users))
        name = self.manifest.logits_output
        if len(distinct) == 1:
            return self.session.run([name], {**feeds, **self.user_tensors(distinct[0], fallbacks)})[0]
        if self.manifest.per_row:
            per_user = {u: self.user_tensors(u, fallbacks) for u in distinct}
            rows = {t.name: np.concatenate([per_user[u].get(t.name, self.base[t.name]) for u in users])
                    for t in self.manifest.trainable}
            return self.session.run([name], {**feeds, **rows})[0]
        # The graph folds batch into another axis: run each user's rows as one group.
        users_arr = np.array([u if u is not None else "\0base" for u in users], dtype=object)
        out: np.ndarray | None = None
        for user in distinct:
            index = np.nonzero(users_arr == (user if user is not None else "\0base"))[0]
            part = {k: v[index] for k, v in feeds.items()}
            if self.encoder is not None and self.manifest.text and self.manifest.text.attention_mask:
                part = _trim_padding(part, self.manifest.text.attention_mask)
            logits = self.session.run([name], {**part, **self.user_tensors(user, fallbacks)})[0]
            if out is None:
                out = np.zeros((len(users), *logits.shape[1:]), logits.dtype)
            if logits.ndim >= 2 and out.ndim >= 2 and logits.shape[1:] != out.shape[1:]:
                padded = np.zeros((len(index), *out.shape[1:]), logits.dtype)
                padded[:, : logits.shape[1]] = logits
                logits = padded
            out[index] = logits
        assert out is not None
        return out

    def predict(self, inputs: Any, user: str | None | Sequence[str | None] = None) -> Prediction:
        """Predict for one user (or the base with ``user=None``), or one user per row.

        Example:
            >>> p.predict(["great flight!"], user="alice").labels             # doctest: +SKIP
            ['positive']
        """
        feeds, rows = self.encode(inputs)
        if user is None or isinstance(user, str):
            users: list[str | None] = [user] * rows
        elif not isinstance(user, Sequence) or isinstance(user, (bytes, bytearray)):
            raise InvalidArgumentError(f"user must be a str, None, or a list with one id per input row; got {type(user).__name__}")
        else:
            users = list(user)
            if len(users) != rows:
                raise InvalidArgumentError(f"user has {len(users)} entries for {rows} inputs; give one per input row")
        for u in users:
            if u is not None and (not isinstance(u, str) or not u):
                raise InvalidArgumentError(f"user ids must be non-empty strings or None, got {u!r}")
        fallbacks: dict[str, str] = {}
        mask_name = self.manifest.text.attention_mask if self.encoder is not None and self.manifest.text else None
        mask = feeds.get(mask_name) if mask_name else None
        if mask is not None and mask.ndim == 2:
            # Text runs in groups of rows of similar length, each padded only to its own longest
            # row (data.length_groups: SCORING_TOKENS padded tokens, at most batch_size rows),
            # then the outputs go back to the inputs' order.
            groups = length_groups(mask.sum(axis=1), token_budget=SCORING_TOKENS, max_rows=self.batch_size)
        else:
            groups = [np.arange(start, min(start + self.batch_size, rows)) for start in range(0, rows, self.batch_size)]
        chunks = []
        for index in groups:
            part = {k: v[index] for k, v in feeds.items()}
            if mask is not None:
                part = _trim_padding(part, mask_name)
            chunks.append(self.logits(part, [users[i] for i in index], fallbacks))
        logits = _concat_ragged(chunks)
        order = np.concatenate(groups)
        if np.any(order[1:] < order[:-1]):  # back to the inputs' order
            logits = logits[np.argsort(order, kind="stable")]
        probabilities, labels = self._interpret(logits)
        return Prediction(logits, probabilities, labels, users, fallbacks)

    def _interpret(self, logits: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        loss, names = self.manifest.loss, self.manifest.labels
        if loss == "mse":
            return logits, logits.reshape(len(logits), -1)[:, 0].tolist() if logits.ndim <= 2 and logits.reshape(len(logits), -1).shape[1] == 1 else logits.tolist()
        if loss == "bce-with-logits":
            probs = 1.0 / (1.0 + np.exp(-logits))
            return probs, [[(names[j] if names else j) for j in np.nonzero(row > 0.5)[0]] for row in probs]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=-1, keepdims=True)
        index = probs.argmax(axis=-1)
        if names:
            labels = np.vectorize(lambda i: names[i], otypes=[object])(index).tolist()
        else:
            labels = index.tolist()
        return probs, labels


def _trim_padding(feeds: dict[str, np.ndarray], mask_name: str) -> dict[str, np.ndarray]:
    # A chunk of a long padded batch need not carry the longest row's padding.
    mask = feeds.get(mask_name)
    if mask is None or mask.ndim != 2:
        return feeds
    length = max(1, int(mask.sum(axis=1).max()))
    return {k: (v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v) for k, v in feeds.items()}


def _concat_ragged(chunks: list[np.ndarray]) -> np.ndarray:
    if len(chunks) == 1 or chunks[0].ndim < 3:
        return np.concatenate(chunks)
    longest = max(c.shape[1] for c in chunks)
    padded = []
    for c in chunks:
        if c.shape[1] < longest:
            pad = np.zeros((c.shape[0], longest - c.shape[1], *c.shape[2:]), c.dtype)
            c = np.concatenate([c, pad], axis=1)
        padded.append(c)
    return np.concatenate(padded)


__all__ = ["Predictor", "Prediction", "resolve_providers", "GraphOptimization"]
