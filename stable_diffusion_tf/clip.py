"""CLIP text transformer (Radford et al. 2021), laid out as transformers' CLIPTextModel (`text_model.*`)."""

from __future__ import annotations

import keras
from keras import ops

from .config import CLIPConfig
from .fast import attention
from .layers import Block, Network, build_leaf, dense, embedding, layer_norm

ACTIVATIONS = {
    "quick_gelu": lambda x: x * ops.sigmoid(1.702 * x),
    "gelu": lambda x: ops.gelu(x, approximate=False),
}


class CLIPEmbeddings(Block):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.token_embedding = embedding(config.vocab_size, config.hidden_size, "token_embedding", dt)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size,
                                            "position_embedding", dt)

    def build(self, input_shape=None):
        self.token_embedding.build()
        self.position_embedding.build()

    def call(self, input_ids, replacements=None):
        """`replacements` = (mask (B, L, 1), vectors (B, L, D)): where mask is true, the vector takes the place of
        the token's embedding (textual-inversion embeddings)."""
        positions = ops.arange(ops.shape(input_ids)[1])
        tokens = self.token_embedding(input_ids)
        if replacements is not None:
            mask, vectors = replacements
            tokens = ops.where(mask, ops.cast(vectors, tokens.dtype), tokens)
        return tokens + self.position_embedding(positions)[None]


class CLIPAttention(Block):
    """Causal multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        dt, dim = self.dtype_policy, config.hidden_size
        self.heads, self.dim = config.num_attention_heads, dim
        self.q_proj = dense(dim, name="q_proj", dtype=dt)
        self.k_proj = dense(dim, name="k_proj", dtype=dt)
        self.v_proj = dense(dim, name="v_proj", dtype=dt)
        self.out_proj = dense(dim, name="out_proj", dtype=dt)

    def build(self, input_shape=None):
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            build_leaf(layer, self.dim, rank=3)

    def call(self, x, mask):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, bias=mask))


class CLIPMLP(Block):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = dense(config.intermediate_size, name="fc1", dtype=self.dtype_policy)
        self.fc2 = dense(config.hidden_size, name="fc2", dtype=self.dtype_policy)

    def build(self, input_shape=None):
        build_leaf(self.fc1, self.config.hidden_size, rank=3)
        build_leaf(self.fc2, self.config.intermediate_size, rank=3)

    def call(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(Block):
    """Pre-LayerNorm transformer layer."""

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.width = config.hidden_size
        self.layer_norm1 = layer_norm(config.layer_norm_eps, "layer_norm1", dt)
        self.self_attn = CLIPAttention(config, name="self_attn", dtype=dt)
        self.layer_norm2 = layer_norm(config.layer_norm_eps, "layer_norm2", dt)
        self.mlp = CLIPMLP(config, name="mlp", dtype=dt)

    def build(self, input_shape=None):
        build_leaf(self.layer_norm1, self.width, rank=3)
        build_leaf(self.layer_norm2, self.width, rank=3)
        self.self_attn.build()
        self.mlp.build()

    def call(self, x, mask):
        x = x + self.self_attn(ops.cast(self.layer_norm1(x), self.compute_dtype), mask)
        return x + self.mlp(ops.cast(self.layer_norm2(x), self.compute_dtype))


class CLIPEncoder(Block):
    """The stack of encoder layers (`encoder.layers.N`)."""

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        self.layers = [CLIPEncoderLayer(config, name=f"layers.{i}", dtype=self.dtype_policy)
                       for i in range(config.num_hidden_layers)]

    def build(self, input_shape=None):
        for layer in self.layers:
            layer.build()


@keras.saving.register_keras_serializable(package="stable_diffusion_tf")
class CLIPTextModel(Network):
    """Token ids (B, L) -> last hidden state after the final LayerNorm (B, L, hidden_size).

    With `output_hidden_states=True` also returns every layer's output as transformers does:
    a list of num_hidden_layers + 1 tensors, the embeddings first, none with the final norm.
    With a `projection_dim` (SDXL's OpenCLIP bigG, transformers' CLIPTextModelWithProjection) it also has the
    `text_projection` of `pooled`.
    """

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.config = config
        self.embeddings = CLIPEmbeddings(config, name="embeddings", dtype=dt)
        self.encoder = CLIPEncoder(config, name="encoder", dtype=dt)
        self.final_layer_norm = layer_norm(config.layer_norm_eps, "final_layer_norm", dt)
        if config.projection_dim:
            self.text_projection = dense(config.projection_dim, name="text_projection", dtype=dt, use_bias=False)

    def build(self, input_shape=None):
        """Creates every variable from the config's sizes (no forward pass)."""
        self.embeddings.build()
        self.encoder.build()
        build_leaf(self.final_layer_norm, self.config.hidden_size, rank=3)
        if self.config.projection_dim:
            build_leaf(self.text_projection, self.config.hidden_size, rank=2)

    def pooled(self, last, input_ids):
        """The projected text embedding: the final hidden state (B, L, D) at each row's end token, found as
        transformers does, as the largest token id (the end token is the last id of CLIP's vocabulary)."""
        end = ops.argmax(input_ids, axis=-1)
        picked = ops.take_along_axis(last, ops.reshape(end, (-1, 1, 1)), axis=1)[:, 0]
        return self.text_projection(picked)

    def call(self, input_ids, output_hidden_states=False, replacements=None):
        length = ops.shape(input_ids)[1]
        causal = ops.triu(ops.full((length, length), float("-inf"), dtype="float32"), k=1)
        x = self.embeddings(input_ids, replacements)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, causal)
            hidden_states.append(x)
        last = ops.cast(self.final_layer_norm(x), self.compute_dtype)
        return (last, hidden_states) if output_hidden_states else last
