"""names.infer_rewrite on header-like name -> shape maps: the one consistent prefix rewrite, or nothing when
shapes disagree, two rewrites do equally well, or a rewrite would put two names on one."""

from graftcore.plan.names import align, infer_rewrite

TEXT = {
    "model.embed_tokens.weight": (96, 32),
    "model.layers.0.mlp.up_proj.weight": (48, 32),
    "lm_head.weight": (96, 32),
}
VL = {"language_model." + n: s for n, s in TEXT.items()} | {"vision_tower.layers.0.mlp.up_proj.weight": (8, 4)}


def test_one_prefix_found():
    assert infer_rewrite(TEXT, VL) == ("", "language_model.")
    mapping, applied, inferred = align(TEXT, VL, [])
    assert inferred and applied == [("", "language_model.", 3)]
    assert all(mapping[n] == "language_model." + n for n in TEXT)


def test_nothing_when_a_shape_disagrees():
    other = dict(VL, **{"language_model.lm_head.weight": (95, 32)})
    mapping, applied, _ = align(TEXT, other, [])
    # the rule that would also move the head is refused (a shape disagrees); the narrower one maps the rest, and the
    # head keeps its name: the planner then reports it
    assert applied == [("model.", "language_model.model.", 2)]
    assert mapping["lm_head.weight"] == "lm_head.weight"
    assert infer_rewrite({"m.a.w": (3,)}, {"x.m.a.w": (2,)}) is None  # Instruct smaller: cannot graft
    assert infer_rewrite({"m.a.w": (2, 4)}, {"x.m.a.w": (3, 4)}) == ("", "x.")  # a grown vocabulary fits


def test_nothing_when_two_rewrites_do_equally_well():
    assert infer_rewrite({"m.a.w": (2,)}, {"x.m.a.w": (2,), "y.m.a.w": (2,)}) is None


def test_nothing_when_names_already_match_or_would_collide():
    assert infer_rewrite(VL, VL) is None
    # rewriting 'b.w' -> 'x.b.w' would collide with the name 'x.b.w' the input already has
    assert infer_rewrite({"m.b.w": (2,), "x.m.b.w": (2,)}, {"x.m.b.w": (2,)}) is None


def test_explicit_rules_win_and_wrappers_are_stripped():
    mapping, applied, inferred = align(TEXT, VL, [("model.", "language_model.model.")])
    assert not inferred and applied == [("model.", "language_model.model.", 2)]
    assert mapping["lm_head.weight"] == "lm_head.weight"
    wrapped = {"module." + n: s for n, s in TEXT.items()}
    mapping, applied, _ = align(wrapped, TEXT, [])
    assert applied == [("module.", "", 3)] and set(mapping.values()) == set(TEXT)


def test_a_grown_vocabulary_still_aligns():
    """A VL Instruct whose vocabulary grew over the text Base's: the rewrite still covers embed and head (the
    planner grafts their shared rows)."""
    grown = dict(
        VL, **{"language_model.model.embed_tokens.weight": (100, 32), "language_model.lm_head.weight": (100, 32)}
    )
    assert infer_rewrite(TEXT, grown) == ("", "language_model.")


def test_renames_that_would_read_two_tensors_as_one_are_refused():
    import pytest

    from graftcore.errors import GraftError

    both = {"model.norm.weight": (4,), "language_model.model.norm.weight": (4,)}
    with pytest.raises(GraftError, match="would both be read as 'language_model.model.norm.weight'"):
        align(both, VL, [("model.", "language_model.model.")])


def test_a_rewrite_never_moves_a_tensor_to_another_layer():
    """Layer 7 of an input does not land on Instruct's layer 1 because the shapes fit: indices are never rewritten."""
    assert infer_rewrite({"model.layers.7.q.weight": (4, 4)}, {"model.layers.1.q.weight": (4, 4)}) is None
