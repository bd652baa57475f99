"""A loaded seq2seq model (a file of kind "seq2seq"): an encoder program over the source
codec, a decoder program over the target codec, and the limits that bound both.

    m = nn2run.load("dates.nnb")           # a Seq2SeqModel for a seq2seq file
    m.translate(["3 March 2024"], beam=4)  # -> ["2024-03-03"]

The header, besides what a language model's holds (`codec` is the source codec):

    "nn2": {"kind": "seq2seq", ...}
    "model": {"layers": L, "hidden": H, "encoder": name, "decoder": name}
    "target": {"codec": the target codec, "begin": n, "end": n + 1}   (n = its vocabulary size)
    "limits": {"source": longest source, "target": longest output}     (tokens, 1..65536)
    "encoder": a program (`nn2run.isa.validate`) with "output" (width H) instead of "logits"
    "decoder": a decoder program (`nn2run.isa.validate_decoder`, run by `nn2run.decoder`)

The encoder runs over a padded batch of sources; its output at every position is the
memory (J positions of H for each row), zero at and beyond each row's length, and `final` is its output at
each row's last position. The decoder then prepares (once per input) and steps, reading
BEGIN first (`nn2run.beam`). Every check is made at load; a failure is an NNBFormatError.

Imports NumPy and the standard library only.
"""

from __future__ import annotations

import numpy as np

from . import beam as beams
from . import codec as codecs
from . import format as fmt
from . import params, rewrite
from .decoder import DecoderVM
from .format import NNBFormatError
from .isa import ProgramError, program_shapes, validate, validate_decoder
from .model import Opened, _check_batch, check_finite, check_ids, check_sizes
from .vm import VM

MAX_LIMIT = 65536
MAX_BATCH_FLOATS = 1 << 28        # a batch's decoder registers: 1 GiB of float32 at most
_CACHED = 8                       # decoder machines kept, by (batch, source length)
BUCKET = 8                        # machines are made for source lengths rounded up to this

# hypotheses are ranked by log-probability / length ** alpha: past this, length ** alpha
# can overflow a float (and values past 2 or 3 are of no use)
MAX_PENALTY = 10


class Seq2SeqModel(Opened):
    """A validated seq2seq .nnb file, ready to translate."""

    def __init__(self, nnb: fmt.NNBFile):
        self._file = nnb
        self.header = nnb.header
        self.tensors = fmt.logical(nnb)
        if nnb.data_sha256_ok:              # the data was read to verify it: its values too
            check_finite(self.tensors)
        try:
            self._check()
        except (ProgramError, codecs.CodecError, params.LayoutError) as e:
            raise NNBFormatError(str(e)) from None
        self._encoders: dict[int, VM] = {}
        self._decoders: dict[tuple, DecoderVM] = {}
        self._bound_encoder = self._bound_decoder = None

    # --- checks -------------------------------------------------------------------
    def _check(self) -> None:
        h = self.header
        self.layers, self.hidden, self.codec = check_sizes(h)
        self.vocab = self.codec.vocab
        self._check_target(h.get("target"))
        self.limits = self._check_limits(h.get("limits"))
        shapes = program_shapes(self.tensors)
        validate(h.get("encoder"), shapes, len(self.vocab), "output", self.hidden)
        validate_decoder(h.get("decoder"), shapes, self.target_size, self.hidden, self.limits["source"])
        self.encoder, self.decoder = h["encoder"], h["decoder"]
        self._slots = params.read_map(h.get("params"), {n: s for n, s in shapes.items() if s is not None})
        per_position = sum(self.decoder["registers"][r] for r in self.decoder["positional"])
        self._plain_floats = sum(self.decoder["registers"]) - per_position
        self._position_floats = 2 * per_position + self.hidden    # scratch, and the encoder's copy

    def _check_target(self, target) -> None:
        if not isinstance(target, dict) or set(target) != {"codec", "begin", "end"}:
            raise NNBFormatError('target must be {"codec", "begin", "end"}')
        self.target_codec = codecs.from_header(target["codec"])
        if self.target_codec.binary:
            raise NNBFormatError("the target codec must be a text codec")
        n = len(self.target_codec.vocab)
        if target["begin"] != n or target["end"] != n + 1 or type(target["begin"]) is not int \
                or type(target["end"]) is not int:
            raise NNBFormatError(f"target begin and end must be {n} and {n + 1} (after the codec's {n} tokens)")
        self.begin, self.end, self.target_size = n, n + 1, n + 2

    @staticmethod
    def _check_limits(limits) -> dict:
        if not isinstance(limits, dict) or set(limits) != {"source", "target"}:
            raise NNBFormatError('limits must be {"source": tokens, "target": tokens}')
        for key, value in limits.items():
            if type(value) is not int or not 1 <= value <= MAX_LIMIT:
                raise NNBFormatError(f"limits.{key} must be an integer in [1, {MAX_LIMIT}], got {fmt.short(value)}")
        return dict(limits)

    # --- parameters -----------------------------------------------------------------
    def param_slots(self) -> list[params.Slot]:
        return list(self._slots.values())

    def param(self, name: str, layer: int = 0) -> np.ndarray:
        """A parameter as the equations use it (the decoder's and the bridge's are layer L)."""
        self._check_open()
        slot = params.find(self._slots, name, layer)
        if slot is None:
            raise KeyError(f"no parameter {name!r} (layer {layer}); have {', '.join(self._slots)}")
        return slot.view(self.tensors[slot.tensor])

    def storage(self) -> str:
        from .model import Model
        return Model.storage(self)

    def bound_encoder(self) -> tuple[dict, dict]:
        """(encoder program, tensors) as the encoder's VMs run it, after the load-time rewrites."""
        self._check_open()
        if self._bound_encoder is None:
            program = {**self.encoder, "logits": self.encoder["output"]}
            self._bound_encoder = rewrite.bind(program, self.tensors)
        return self._bound_encoder

    def bound_decoder(self) -> tuple[dict, dict]:
        """(decoder program, tensors) as the decoder machines run it, after the load-time
        rewrites of its step (`nn2run.rewrite.bind_decoder`)."""
        self._check_open()
        if self._bound_decoder is None:
            self._bound_decoder = rewrite.bind_decoder(self.decoder, self.bound_encoder()[1])
        return self._bound_decoder

    # --- running ----------------------------------------------------------------------

    def encode_texts(self, texts) -> list[list[int]]:
        """Each source text as token ids; a ValueError names the first text that cannot be."""
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, (bytes, str) if self.codec.binary else str):
                raise ValueError(f"source {i}: expected text, got {type(text).__name__}")
            unknown = self.unknown(text)
            if unknown:
                raise ValueError(f"source {i}: characters not in the model's vocabulary: "
                                 + " ".join(repr(c) for c in unknown))
            ids = self.codec.encode(text) if text else []
            if len(ids) > self.limits["source"]:
                raise ValueError(f"source {i}: {len(ids)} tokens, longer than the model's limit "
                                 f"of {self.limits['source']}")
            out.append(ids)
        return out

    def unknown(self, text) -> list[str]:
        """The distinct characters of `text` the source codec does not know."""
        return self.codec.unknown(text) if hasattr(self.codec, "unknown") else []

    def machine(self, sources: list[list[int]], copies: int = 1) -> DecoderVM:
        """A decoder machine started on `sources` (each non-empty, within limits.source), each
        source's rows repeated `copies` times (the beams of beam search)."""
        self._check_open()
        if not sources or any(not s for s in sources):
            raise ValueError("sources must be a non-empty list of non-empty token lists")
        n, longest = len(sources), max(map(len, sources))
        batch = n * copies
        _check_batch(batch)
        if longest > self.limits["source"]:
            raise ValueError(f"a source of {longest} tokens is longer than the model's limit "
                             f"of {self.limits['source']}")
        # padding positions are masked out exactly (zero memory, zero weight), so one machine
        # serves every batch whose longest source rounds up to the same bucket
        positions = min(-(-longest // BUCKET) * BUCKET, self.limits["source"])
        floats = batch * (self._plain_floats + positions * self._position_floats)
        if floats > MAX_BATCH_FLOATS:
            raise ValueError(f"a batch of {batch} rows over sources of {positions} tokens needs "
                             f"{floats} floats, more than {MAX_BATCH_FLOATS}: use a smaller batch")
        dec = self._decoders.pop((batch, positions), None)
        if dec is None:
            if len(self._decoders) >= _CACHED:
                self._decoders.pop(next(iter(self._decoders)))
            dec = DecoderVM(*self.bound_decoder(), batch, positions)
        self._decoders[(batch, positions)] = dec
        self._encode(sources, dec, copies, longest)
        dec.start()
        return dec

    def _encode(self, sources, dec: DecoderVM, copies: int, longest: int) -> None:
        n, positions = len(sources), dec.positions
        ids = np.zeros((n, longest), dtype=np.intp)
        lengths = np.array([len(s) for s in sources])
        for i, s in enumerate(sources):
            ids[i, :len(s)] = self._checked(s)
        if n not in self._encoders:
            _check_batch(n)
            self._encoders[n] = VM(*self.bound_encoder(), n)
        enc = self._encoders[n]
        enc.reset()
        memory = dec.memory.reshape(positions, n, copies, self.hidden)
        for t in range(longest):        # later positions keep old values: the mask zeroes them
            memory[t] = enc.advance(ids[:, t])[:, None, :]
        mask = np.arange(positions)[:, None] < np.repeat(lengths, copies)[None, :]
        dec.mask[...] = mask[:, :, None]
        np.multiply(dec.memory, dec.mask, dec.memory)
        dec.final[...] = dec.memory[np.repeat(lengths - 1, copies), np.arange(n * copies)]

    def _checked(self, ids) -> np.ndarray:
        return check_ids(ids, len(self.vocab))

    def encode(self, sources: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(memory (batch, J, H), final (batch, H)) of a batch of token-id sources: copies."""
        dec = self.machine(sources)
        return dec.memory.transpose(1, 0, 2).copy(), dec.final.copy()

    def force(self, sources: list[list[int]], targets: list[list[int]], watch=()) -> tuple:
        """Teacher forcing: step t reads BEGIN then targets[b][t-1] (END beyond each target);
        returns (logits (batch, T, Vt), {register: (batch, T, ...) values}) for T = the longest
        target + 1 steps and each register in `watch` (e.g. the attention weights)."""
        if len(targets) != len(sources):
            raise ValueError("one target per source")
        steps = max(map(len, targets)) + 1
        ids = np.full((len(targets), steps), self.end, dtype=np.intp)
        ids[:, 0] = self.begin
        for i, t in enumerate(targets):
            ids[i, 1:len(t) + 1] = np.asarray(t, dtype=np.intp).reshape(-1) if t else []
        ids = self._checked_target(ids)
        dec = self.machine(sources)
        logits, seen = [], {r: [] for r in watch}
        for t in range(steps):
            logits.append(dec.advance(ids[:, t]).copy())
            for r in watch:
                seen[r].append(dec.register(r).copy())
        return np.stack(logits, 1), {r: np.stack(v, 1) for r, v in seen.items()}

    def _checked_target(self, ids):
        return check_ids(ids, self.target_size).reshape(ids.shape)

    def search(self, sources: list[list[int]], beam: int = 1, length_penalty: float = 1.0,
               max_len: int | None = None) -> list[list[beams.Hypothesis]]:
        """Each source's hypotheses, best first: one (greedy) for beam 1, else `beam`."""
        if type(beam) is not int or beam < 1:
            raise ValueError(f"beam must be a positive integer, got {beam!r}")
        limit = self.limits["target"] if max_len is None else min(max_len, self.limits["target"])
        if type(limit) is not int or limit < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if not isinstance(length_penalty, (int, float)) or not 0 <= length_penalty <= MAX_PENALTY:
            raise ValueError(f"length_penalty must be a number from 0 to {MAX_PENALTY}, got {length_penalty!r}")
        dec = self.machine(sources, beam)
        if beam == 1:
            return [[h] for h in beams.greedy(dec, len(sources), self.begin, self.end, limit)]
        return beams.search(dec, len(sources), beam, self.begin, self.end, limit, float(length_penalty))

    def detokenize(self, tokens) -> str:
        vocab = self.target_codec.vocab
        return "".join(vocab[t] for t in tokens)

    def translate(self, texts, beam: int = 1, n_best: int | None = None, length_penalty: float = 1.0,
                  max_len: int | None = None):
        """Translate each text: a list of strings; with n_best, per text a list of its n_best
        best (translation, average log-probability) pairs. An empty text gives ''."""
        if isinstance(texts, (str, bytes)):
            raise ValueError("translate takes a list of texts")
        if n_best is not None and (type(n_best) is not int or not 1 <= n_best <= beam):
            raise ValueError(f"n_best must be an integer in [1, beam={beam}], got {n_best!r}")
        encoded = self.encode_texts(list(texts))
        live = [i for i, ids in enumerate(encoded) if ids]
        found = self.search([encoded[i] for i in live], beam, length_penalty, max_len) if live else []
        results = [[beams.Hypothesis([], 0.0, 1)] for _ in encoded]
        for i, hyps in zip(live, found):
            results[i] = hyps
        if n_best is None:
            return [self.detokenize(h[0].tokens) for h in results]
        return [[(self.detokenize(h.tokens), h.score) for h in hyps[:n_best]] for hyps in results]

    def _release(self) -> None:
        self._encoders.clear()
        self._decoders.clear()
        self._bound_encoder = None
