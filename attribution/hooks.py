"""Every TransformerLens hook name the analyses use, in one place (TransformerBridge's canonical names)."""

EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"
FINAL_LN_IN = "ln_final.hook_in"


def _in_block(name: str):
    """The hook-name function of a per-block hook: layer -> "blocks.{layer}.{name}"."""
    def hook_name(layer: int) -> str:
        return f"blocks.{layer}.{name}"
    return hook_name


resid_pre = _in_block("hook_resid_pre")
resid_post = _in_block("hook_resid_post")
z = _in_block("attn.hook_z")            # per-head attention outputs before W_O: [batch, pos, head, d_head]
q = _in_block("attn.hook_q")
k = _in_block("attn.hook_k")
v = _in_block("attn.hook_v")
pattern = _in_block("attn.hook_pattern")
mlp_out = _in_block("hook_mlp_out")
mlp_post = _in_block("mlp.hook_post")   # MLP neuron activations: [batch, pos, d_mlp]


def ln_in(layer: int, ln: str) -> str:
    """The input of a block's LN, `ln` being "ln1" (attention) or "ln2" (MLP)."""
    return f"blocks.{layer}.{ln}.hook_in"


def layer_of(name: str) -> int:
    """The block a per-block hook name belongs to ("blocks.3.attn.hook_z" -> 3)."""
    return int(name.split(".")[1])
