"""TarFlow: a transformer autoregressive normalizing flow for images and vectors (Zhai et al., 2024).

Data x (B, *shape) is cut into N tokens of d values: p x p patches of C channels for images
(d = C p^2), `token_dim` consecutive coordinates for vectors. Each of T blocks reverses the token
order on odd blocks (identity on even ones), runs K causal pre-LN transformer layers and applies
    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),    log|det dz/dx| = -sum_i alpha_i,
with (alpha, mu) the transformer outputs shifted one token right (`model.transform: spline` follows
the affine map with a monotone rational-quadratic spline whose knots are predicted the same way;
`nfm.token_transforms`). Token 0, which sees no earlier token, gets learned per-block parameters.
The output projection and those token-0 parameters start at zero, so every block starts as the
identity. Encoding (data -> noise) is one parallel pass; decoding inverts the blocks in reverse order,
one token at a time, with a key/value cache.
With `model.interleave` (vectors with token_dim k > 1), blocks 2 and 3 of every 4 group the D = N k
coordinates the other way, coordinates j, j + N, j + 2N, ... into token j: coordinates that share a
token (and so never condition on each other) in one grouping condition on each other in the other.
A permutation, it adds nothing to log|det|.
With `model.logit_alpha` a > 0 the blocks see logit(a + (1 - 2a)(x + 1)/2) of data in [-1, 1] instead
of x (RealNVP's preprocessing for dequantized images, `nfm.logit_map`); its log-Jacobian is part of
log|det dz/dx|.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from nfm import token_transforms
from nfm.logit_map import check_logit_alpha, from_logit, to_logit
from nfm.token_transforms import TRANSFORMS, params_per_value


@dataclass
class TarFlowConfig:
    """Architecture, conditioning and training-noise level of a TarFlow."""

    name: str = "tarflow"
    patch: int = 2  # image patch side p: a token holds C*p*p values (images only)
    token_dim: int = 1  # values per token for vector data of shape (D,); must divide D
    width: int = 128  # transformer width W
    blocks: int = 4  # flow blocks T (token order alternates identity / reversal)
    layers: int = 2  # causal transformer layers K per block
    head_dim: int = 64  # channels per attention head; must divide width
    mlp_ratio: int = 4  # MLP hidden width as a multiple of width
    dropout: float = 0.0  # dropout on attention weights and residual branches while training
    num_classes: int = 0  # number of class labels for conditioning (0: unconditional)
    label_dropout: float = 0.1  # training probability of replacing a label by the learned null class
    eta: float = 0.05  # std of the Gaussian noise added to training data; 0 for dequantized likelihood runs
    transform: str = "affine"  # per-value map of a block: affine, or spline (affine then a rational-quadratic spline)
    spline_bins: int = 8  # spline bins K (transform: spline)
    spline_bound: float = 4.0  # the spline acts on [-B, B] after the affine map, identity outside (transform: spline)
    logit_alpha: float = 0.0  # > 0: blocks see logit(a + (1 - 2a)(x + 1)/2) of data in [-1, 1] (RealNVP); 0: x itself
    final_norm: bool = True  # a LayerNorm before each block's output projection (false: none, as in ml-tarflow)
    prior_var: bool = False  # a (N, d) buffer `prior_var`: sampling scales the noise by its sqrt (ml-tarflow's `var`)
    interleave: bool = False  # vectors: blocks 2-3 of every 4 put coordinates j, j+N, j+2N, ... into token j

    def flow_layers(self) -> int:
        """Flow layers: blocks x causal transformer layers per block."""
        return self.blocks * self.layers


class KVCache:
    """Keys and values of the tokens decoded so far: one (B, heads, N, head_dim) buffer pair per layer."""

    def __init__(self, layers: int, length: int):
        self.length = length
        self.keys: list[Tensor | None] = [None] * layers
        self.values: list[Tensor | None] = [None] * layers

    def append(self, layer: int, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new token's k, v (B, heads, 1, head_dim) at `pos`; return keys and values of tokens 0..pos."""
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.length, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, pos] = k[:, :, 0]
        values[:, :, pos] = v[:, :, 0]
        return keys[:, :, :pos + 1], values[:, :, :pos + 1]


class Attention(nn.Module):
    """Multi-head causal self-attention over tokens (B, L, W)."""

    def __init__(self, width: int, head_dim: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = width // head_dim, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def _qkv(self, h: Tensor) -> list[Tensor]:
        return list(rearrange(self.qkv(h), "b l (n h d) -> n b h l d", n=3, h=self.heads))

    def forward(self, h: Tensor) -> Tensor:
        """All tokens in parallel: token i attends to tokens 0..i."""
        q, k, v = self._qkv(h)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))

    def step(self, h: Tensor, pos: int, cache: KVCache, layer: int) -> Tensor:
        """One new token h (B, 1, W) at position `pos`, attending to the cached tokens and itself."""
        q, k, v = self._qkv(h)
        keys, values = cache.append(layer, pos, k, v)
        out = F.scaled_dot_product_attention(q, keys, values)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Layer(nn.Module):
    """Pre-LN transformer layer: causal attention then a GELU MLP, each on a residual branch."""

    def __init__(self, cfg: TarFlowConfig):
        super().__init__()
        w = cfg.width
        self.norm1, self.norm2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = Attention(w, cfg.head_dim, cfg.dropout)
        self.mlp = nn.Sequential(nn.Linear(w, cfg.mlp_ratio * w), nn.GELU(), nn.Linear(cfg.mlp_ratio * w, w))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.drop(self.attn(self.norm1(h)))
        return h + self.drop(self.mlp(self.norm2(h)))

    def step(self, h: Tensor, pos: int, cache: KVCache, layer: int) -> Tensor:
        """The same layer on one new token with cached keys and values (inference: no dropout)."""
        h = h + self.attn.step(self.norm1(h), pos, cache, layer)
        return h + self.mlp(self.norm2(h))


def interleave(tokens: Tensor) -> Tensor:
    """Tokens (B, N, k) of consecutive coordinates -> (B, N, k) whose token j holds coordinates j, j + N, ..."""
    b, n, k = tokens.shape
    return tokens.reshape(b, k, n).transpose(1, 2)


def deinterleave(tokens: Tensor) -> Tensor:
    """The inverse of `interleave`."""
    b, n, k = tokens.shape
    return tokens.transpose(1, 2).reshape(b, n, k)


class FlowBlock(nn.Module):
    """One autoregressive block on tokens (B, N, d), regrouping (`regroup`) and reversing (`flip`) them first.

    The per-value map (affine or spline) is `nfm.token_transforms`; its P parameters per value are
    predicted as (P, d) per token.
    """

    def __init__(self, cfg: TarFlowConfig, n_tokens: int, token_dim: int, flip: bool, regroup: bool = False):
        super().__init__()
        self.flip, self.regroup, self.num_classes = flip, regroup, cfg.num_classes
        self.transform, self.bins, self.bound = cfg.transform, cfg.spline_bins, cfg.spline_bound
        self.n_params = params_per_value(cfg.transform, cfg.spline_bins)
        self.inp = nn.Linear(token_dim, cfg.width)
        self.pos = nn.Parameter(0.01 * torch.randn(n_tokens, cfg.width))
        self.label = nn.Embedding(cfg.num_classes + 1, cfg.width) if cfg.num_classes else None
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width) if cfg.final_norm else nn.Identity()
        self.out = nn.Linear(cfg.width, self.n_params * token_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.first = nn.Parameter(torch.zeros(self.n_params * token_dim))  # the map's parameters for token 0

    def _permute(self, tokens: Tensor) -> Tensor:
        """Tokens in the model's layout -> the block's order (regrouped, then reversed)."""
        tokens = interleave(tokens) if self.regroup else tokens
        return tokens.flip(1) if self.flip else tokens

    def _unpermute(self, tokens: Tensor) -> Tensor:
        """The inverse of `_permute`."""
        tokens = tokens.flip(1) if self.flip else tokens
        return deinterleave(tokens) if self.regroup else tokens

    def _inputs(self, x: Tensor, y: Tensor | None, guidance: float, start: int) -> Tensor:
        """Embedded tokens x (B, L, d) from position `start`; doubled to [cond; null] under guidance."""
        h = self.inp(x) + self.pos[start:start + x.shape[1]]
        if self.label is None:
            return h
        if guidance:
            h = torch.cat([h, h])
            y = torch.cat([y, torch.full_like(y, self.num_classes)])
        return h + self.label(y)[:, None]

    @staticmethod
    def _guide(out: Tensor, guidance: float) -> Tensor:
        """(1 + w) * conditional - w * unconditional outputs (every map parameter alike)."""
        if not guidance:
            return out
        cond, uncond = out.chunk(2)
        return (1 + guidance) * cond - guidance * uncond

    def outputs(self, x: Tensor, y: Tensor | None, guidance: float = 0.0) -> Tensor:
        """Unshifted map parameters (B, L, P*d): position i predicts those of token i + 1 from tokens 0..i."""
        h = self._inputs(x, y, guidance, 0)
        for layer in self.layers:
            h = layer(h)
        return self._guide(self.out(self.norm(h)), guidance)

    def step(self, x: Tensor, pos: int, cache: KVCache, y: Tensor | None, guidance: float) -> Tensor:
        """`outputs` of one new token x (B, 1, d) at position `pos`, with the earlier tokens cached."""
        h = self._inputs(x, y, guidance, pos)
        for i, layer in enumerate(self.layers):
            h = layer.step(h, pos, cache, i)
        return self._guide(self.out(self.norm(h)), guidance)

    def _params(self, flat: Tensor) -> Tensor:
        """Flat parameters (..., P*d) -> (..., P, d)."""
        return flat.unflatten(-1, (self.n_params, -1))

    def forward(self, x: Tensor, y: Tensor | None = None, guidance: float = 0.0) -> tuple[Tensor, Tensor]:
        """Tokens x (B, N, d) -> z (B, N, d) and log|det dz/dx| (B,) in nats per sample."""
        x = self._permute(x)
        out = self.outputs(x[:, :-1], y, guidance).to(x.dtype)  # the last token predicts nothing
        params = torch.cat([self.first.to(x.dtype).expand(x.shape[0], 1, -1), out], 1)
        z, logdet = token_transforms.forward(x, self._params(params), self.transform, self.bins, self.bound)
        return self._unpermute(z), logdet.sum((1, 2))

    def inverse(self, z: Tensor, y: Tensor | None = None, guidance: float = 0.0, use_cache: bool = True) -> Tensor:
        """Invert `forward` token by token (x_i = z_i * exp(alpha_i) + mu_i when affine), N - 1 sequential passes."""
        z = self._permute(z)
        n = z.shape[1]
        x = torch.empty_like(z)
        invert = token_transforms.inverse
        first = self._params(self.first.to(z.dtype)).expand(z.shape[0], -1, -1)
        x[:, 0] = invert(z[:, 0], first, self.transform, self.bins, self.bound)
        cache = KVCache(len(self.layers), n) if use_cache else None
        for i in range(n - 1):
            if cache is not None:
                out = self.step(x[:, i:i + 1], i, cache, y, guidance)[:, 0]
            else:
                out = self.outputs(x[:, :i + 1], y, guidance)[:, -1]
            x[:, i + 1] = invert(z[:, i + 1], self._params(out.to(z.dtype)), self.transform, self.bins, self.bound)
        return self._unpermute(x)


class TarFlow(nn.Module):
    """A stack of T autoregressive flow blocks on patch tokens (images) or coordinate tokens (vectors)."""

    def __init__(self, cfg: TarFlowConfig, data_shape: tuple[int, ...]):
        super().__init__()
        _check_config(cfg)
        self.cfg, self.data_shape = cfg, tuple(int(s) for s in data_shape)
        self.eta, self.num_classes = cfg.eta, cfg.num_classes
        if len(self.data_shape) == 3:
            c, h, w = self.data_shape
            p = cfg.patch
            if h % p or w % p:
                raise ValueError(f"tarflow patch {p} must divide the image height {h} and width {w}")
            self.n_tokens, self.token_dim = (h // p) * (w // p), c * p * p
            if cfg.interleave:
                raise ValueError("tarflow interleave regroups the coordinates of vectors; images have patch tokens")
        elif len(self.data_shape) == 1:
            (d,) = self.data_shape
            if d % cfg.token_dim:
                raise ValueError(f"tarflow token_dim {cfg.token_dim} must divide the vector size {d}")
            self.n_tokens, self.token_dim = d // cfg.token_dim, cfg.token_dim
        else:
            raise ValueError(f"tarflow takes images (C, H, W) or vectors (D,), got data shape {self.data_shape}")
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, self.n_tokens, self.token_dim, flip=t % 2 == 1, regroup=cfg.interleave and t % 4 >= 2)
            for t in range(cfg.blocks))
        if cfg.prior_var:
            self.register_buffer("prior_var", torch.ones(self.n_tokens, self.token_dim))

    @property
    def decode_passes(self) -> int:
        """Sequential transformer passes of one decode: T * (N - 1)."""
        return len(self.blocks) * (self.n_tokens - 1)

    def to_tokens(self, x: Tensor) -> Tensor:
        """Data (B, *data_shape) -> tokens (B, N, d)."""
        if len(self.data_shape) == 3:
            return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.cfg.patch, q=self.cfg.patch)
        return x.reshape(x.shape[0], self.n_tokens, self.token_dim)

    def from_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, N, d) -> data (B, *data_shape)."""
        if len(self.data_shape) == 3:
            c, h, _ = self.data_shape
            p = self.cfg.patch
            return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h // p, c=c, p=p, q=p)
        return tokens.reshape(tokens.shape[0], *self.data_shape)

    def _labels(self, y: Tensor | None, batch: int, device: torch.device, guidance: float) -> Tensor | None:
        """Labels (B,) for a conditional model (None -> the null class); None for an unconditional one."""
        if not self.num_classes:
            if guidance:
                raise ValueError("classifier-free guidance needs a class-conditional tarflow (model.num_classes > 0)")
            return None
        if y is None:
            if guidance:
                raise ValueError("classifier-free guidance needs class labels y")
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return y.to(device=device, dtype=torch.long)

    def scale_prior_noise(self, noise: Tensor) -> Tensor:
        """Standard normal noise (B, *shape) -> prior noise: times sqrt(prior_var) per token value with
        `model.prior_var` (ml-tarflow samples from N(0, diag(var)) but scores z under N(0, I)), else unchanged."""
        if not self.cfg.prior_var:
            return noise
        return self.from_tokens(self.to_tokens(noise) * self.prior_var.sqrt().to(noise.dtype))

    def to_logit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data x (B, *shape) -> v and log|det dv/dx| (B,) nats: `nfm.logit_map.to_logit` with `model.logit_alpha`."""
        return to_logit(x, self.cfg.logit_alpha, "tarflow")

    def from_logit(self, v: Tensor) -> Tensor:
        """The inverse of `to_logit` (identity when `model.logit_alpha` is 0)."""
        return from_logit(v, self.cfg.logit_alpha)

    def encode(self, x: Tensor, y: Tensor | None = None, guidance: float = 0.0) -> tuple[Tensor, Tensor]:
        """Data x (B, *shape) -> noise z (same shape) and log|det dz/dx| (B,) in nats per sample (fp32 or fp64).

        y (B,) are class labels in [0, num_classes] (num_classes is the null class, also used for
        y=None); unconditional models ignore y. `guidance` w encodes with the guided (alpha, mu).
        """
        y = self._labels(y, x.shape[0], x.device, guidance)
        v, logdet = self.to_logit(x)
        tokens = self.to_tokens(v)
        for block in self.blocks:
            tokens, ld = block(tokens, y, guidance)
            logdet = logdet + ld
        return self.from_tokens(tokens), logdet

    def encode_with_levels(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`encode` plus the output of every block (B, *shape) in order; the last equals z."""
        y = self._labels(y, x.shape[0], x.device, 0.0)
        v, logdet = self.to_logit(x)
        tokens = self.to_tokens(v)
        outputs = []
        for block in self.blocks:
            tokens, ld = block(tokens, y, 0.0)
            logdet = logdet + ld
            outputs.append(self.from_tokens(tokens))
        return outputs[-1], logdet, outputs

    @torch.no_grad()
    def decode(self, z: Tensor, y: Tensor | None = None, use_cache: bool = True, guidance: float = 0.0) -> Tensor:
        """Noise z (B, *shape) -> data x: blocks in reverse order, tokens one at a time (inverse of `encode`)."""
        y = self._labels(y, z.shape[0], z.device, guidance)
        tokens = self.to_tokens(z if z.dtype == torch.float64 else z.float())
        for block in reversed(self.blocks):
            tokens = block.inverse(tokens, y, guidance, use_cache)
        return self.from_logit(self.from_tokens(tokens))

    def forward(self, x: Tensor, *, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The training pass, `encode(x, y)`: (z, log|det dz/dx| (B,) nats per sample)."""
        return self.encode(x, y)


def _check_config(cfg: TarFlowConfig) -> None:
    """Raise ValueError for sizes and rates a TarFlow cannot be built with."""
    if min(cfg.patch, cfg.token_dim, cfg.width, cfg.blocks, cfg.layers, cfg.head_dim, cfg.mlp_ratio) < 1:
        raise ValueError("tarflow patch, token_dim, width, blocks, layers, head_dim and mlp_ratio must be >= 1")
    if cfg.width % cfg.head_dim:
        raise ValueError(f"tarflow head_dim {cfg.head_dim} must divide width {cfg.width}")
    if not 0 <= cfg.label_dropout < 1 or not 0 <= cfg.dropout < 1:
        raise ValueError(f"tarflow dropout {cfg.dropout} and label_dropout {cfg.label_dropout} must lie in [0, 1)")
    if cfg.transform not in TRANSFORMS:
        raise ValueError(f"tarflow transform must be one of {TRANSFORMS}, got {cfg.transform!r}")
    if cfg.transform == "spline" and (cfg.spline_bins < 2 or cfg.spline_bound <= 0):
        raise ValueError(f"tarflow spline_bins {cfg.spline_bins} must be >= 2 and spline_bound "
                         f"{cfg.spline_bound} > 0")
    if cfg.eta < 0 or cfg.num_classes < 0:
        raise ValueError(f"tarflow eta {cfg.eta} and num_classes {cfg.num_classes} must be >= 0")
    check_logit_alpha("tarflow", cfg.logit_alpha, cfg.eta)


@torch.no_grad()
def encode_batched(flow: TarFlow, x: Tensor, y: Tensor | None = None, batch_size: int = 256,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Batched inference encode on the flow's device: z (fp32, on x's device) and logdet (B,) nats per sample.

    `dtype=torch.bfloat16` runs the transformers under bf16 autocast; the affine maps and the
    log-determinant stay in fp32.
    """
    device = next(flow.parameters()).device
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"encode dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    zs, logdets = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        yb = None if y is None else y[start:start + batch_size].to(device)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with ctx:
            z, logdet = flow.encode(xb, yb)
        zs.append(z.float().to(x.device))
        logdets.append(logdet.float().to(x.device))
    return torch.cat(zs), torch.cat(logdets)


def build_tarflow(cfg: TarFlowConfig, data_shape: tuple[int, ...]) -> TarFlow:
    """Build `model.name: tarflow` for images (C, H, W) or vectors (D,)."""
    return TarFlow(cfg, data_shape)
