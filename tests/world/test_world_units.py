"""The portrait world's pieces that need no training: math against hand-written references,
the word tokenizer, world URIs and their cache keys, the sample grid."""

import json
import math

import numpy as np
import pytest
import torch

from w2svd import world, world_vae
from w2svd.config import load_config
from w2svd.models.encoders import TextEncoders, WordTokenizer, encoder_ids, vae_kwargs


def test_psnr_matches_hand_computed_values():
    x = torch.zeros(2, 4)
    y = torch.tensor([[0.1, -0.1, 0.1, -0.1], [0.0, 0.0, 0.0, 0.2]])
    # MSE 0.01 and 0.01: 10·log10(2² / 0.01) = 10·log10(400)
    expected = 10 * math.log10(400.0)
    assert world_vae.psnr(y, x).tolist() == pytest.approx([expected, expected])
    assert world_vae.psnr(x, x).isinf().all()
    # uint8 convention: range 255, one pixel off by 255 of four -> MSE 255²/4 -> 10·log10(4)
    a, b = torch.tensor([[0.0, 0, 0, 0]]), torch.tensor([[255.0, 0, 0, 0]])
    assert float(world_vae.psnr(a, b, data_range=255.0)[0]) == pytest.approx(10 * math.log10(4.0))
    with pytest.raises(ValueError):
        world_vae.psnr(torch.zeros(1, 2), torch.zeros(1, 3))


def test_kl_to_standard_normal_matches_closed_form():
    mean = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])
    # per element 0.5·(m² + σ² − 1 − log σ²): [0, 0.5] and [2, 0.5·(4 − 1 − log 4)]
    rows = [0.5, 2.0 + 0.5 * (3.0 - math.log(4.0))]
    assert float(world_vae.kl_to_standard_normal(mean, logvar)) == pytest.approx(sum(rows) / 2)


def test_word_tokenizer_one_token_per_word_and_factor_words_distinct():
    from w2svd.data import synth

    tok = WordTokenizer()
    ids, mask = tok(["Pale skin, black hair.", "pale SKIN black hair"], max_length=8)
    assert ids[0].tolist() == ids[1].tolist()  # case and punctuation do not matter
    assert mask[0].sum() == 6 and ids[0, 0] == tok.bos_id and ids[0, 5] == tok.eos_id
    words = {w for name in (*synth.SKIN_TONES, *synth.HAIR_COLORS, *synth.BACKGROUNDS, *synth.FACE_SHAPES,
                            "talking", "silent", "left", "right", "still", "turning", "holding") for w in name.split()}
    assert len({tok.word_id(w) for w in words}) == len(words), "two factor words share a token id"


def test_portrait_text_encoders_tell_every_factor_apart():
    cfg = load_config("portrait")
    text = TextEncoders(cfg)
    base = ("A portrait video of a person with pale skin, black hair and a oval face in front of a blue "
            "background, talking, holding the head still, blinking.")
    variants = [base, base.replace("pale", "dark"), base.replace("black hair", "red hair"),
                base.replace("blue background", "green background"), base.replace("talking", "silent, mouth closed"),
                base.replace("oval", "round")]
    t, m, p = text.encode(variants)
    assert t.shape[1] == cfg.model.text_max_length and int(m[0].sum()) < cfg.model.text_max_length
    for i in range(1, len(variants)):
        assert (t[i] - t[0]).norm() > 0.05 * t[0].norm(), variants[i]
        assert (p[i] - p[0]).norm() > 0.02 * p[0].norm(), variants[i]
    again = TextEncoders(cfg).encode(variants)
    assert torch.equal(again[0], t) and torch.equal(again[2], p)  # deterministic across builds


def test_portrait_pooled_vector_is_a_projection_of_the_word_counts():
    text = TextEncoders(load_config("portrait"))
    p = text.encode(["red hair", "hair, red", "red", "hair", "red red hair"])[2].double()
    # Order and punctuation do not matter; counts_BV · R_VP / sqrt(n_B), by hand from two words.
    assert torch.allclose(p[0], p[1])
    assert torch.allclose(p[0] * math.sqrt(2), p[2] + p[3], atol=1e-5)
    assert torch.allclose(p[4] * math.sqrt(3), 2 * p[2] + p[3], atol=1e-5)
    assert not torch.allclose(p[2], p[3], atol=0.1)
    assert text.clip is None  # the pooled vector needs no CLIP model, so none is built


def test_world_uris_and_keys():
    assert world.parse_world_uri("world:portrait/vae") == ("portrait", "vae")
    assert world.parse_world_uri("world:/abs/cfg.yaml/teacher") == ("/abs/cfg.yaml", "teacher")
    for bad in ("world:portrait", "world:portrait/unet", "world:/vae"):
        with pytest.raises(ValueError):
            world.parse_world_uri(bad)
    cfg = load_config("portrait")
    assert world.vae_key(cfg) == world.vae_key(load_config("portrait", ["optim.steps=3"]))  # not a VAE setting
    assert world.vae_key(cfg) != world.vae_key(load_config("portrait", ["world.vae_steps=7"]))
    assert world.teacher_key(cfg) != world.teacher_key(load_config("portrait", ["world.teacher_steps=7"]))
    assert encoder_ids(cfg)[0].startswith("world:portrait/vae@" + world.vae_key(cfg))


def test_unbuilt_world_part_is_a_one_line_error_naming_the_build(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("base: portrait\nworld: {teacher_steps: 7}\n")
    with pytest.raises(FileNotFoundError, match=f"run `w2svd world build --config {other}`"):
        world.resolve_world_uri(f"world:{other}/teacher", cache_dir=tmp_path)


@pytest.mark.parametrize("config", ["portrait", "portrait-i2v"])
@pytest.mark.parametrize("part", world.PARTS)
def test_committed_world_parts_match_the_portrait_configs(tmp_path, config, part):
    """The demo and the evaluation tests use the committed portrait worlds on a fresh machine: an
    edit to a config that changes what a part depends on must come with a rebuilt part."""
    folder = world.resolve_world_uri(f"world:{config}/{part}", cache_dir=tmp_path)
    assert folder.parent == world.PREBUILT_DIR, (
        f"no committed {part} for the current {config}.yaml: run `w2svd world build --config {config}` and "
        f"commit its folder (without latents/) under w2svd/worlds/")
    assert json.loads((folder / world.REPORT_FILE).read_text())["key"] == world.part_key(load_config(config), part)


def test_teacher_key_ignores_distillation_only_settings():
    cfg = load_config("portrait")
    for distill_only in ("method.gen_update_every=3", "method.alpha_weak=0.5", "optim.generator_lr=1e-5"):
        assert world.teacher_key(load_config("portrait", [distill_only])) == world.teacher_key(cfg), distill_only
    for teacher_setting in ("method.shift=5", "optim.finetune_lr=1e-4", "model.arch.num_layers=3",
                            "optim.finetune_ema=0.999"):
        assert world.teacher_key(load_config("portrait", [teacher_setting])) != world.teacher_key(cfg), teacher_setting
    # A setting added later is hashed only away from its old behaviour: committed keys survive it.
    for name, old_value in world.LATER_OPTIM_FIELDS.items():
        assert world.teacher_key(load_config("portrait", [f"optim.{name}={old_value}"])) == world.teacher_key(cfg)
    # How the fine-tune runs does not change what it learns.
    for name, value in world.EXECUTION_PARALLEL_FIELDS.items():
        assert world.teacher_key(load_config("portrait", [f"parallel.{name}={not value}"])) == world.teacher_key(cfg)


def test_small_vae_builds_from_config_with_four_times_spatial_compression():
    from diffusers import AutoencoderKLHunyuanVideo

    cfg = load_config("portrait")
    vae = AutoencoderKLHunyuanVideo(**vae_kwargs(cfg)).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 9, 32, 16)).latent_dist.mode()
    assert tuple(z.shape) == (1, cfg.model.vae_arch.latent_channels, 3, 8, 4)


def test_sample_grid_shape():
    from w2svd.previews import sample_grid

    clips = np.zeros((4, 9, 16, 12, 3), np.uint8)
    img = sample_grid([("real", clips), ("teacher", clips[:2])], frames=3, clips=2, scale=2, label_width=50)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert img.shape[1] == 50 + 2 * (3 * 12 + 4) * 2 and img.shape[0] == 2 * (16 * 2 + 4)


def test_portrait_teacher_probe_refuses_unknown_variants_and_unbuilt_folders(tmp_path, capsys):
    from bench import portrait_teacher

    with pytest.raises(SystemExit):
        portrait_teacher.main(["--latents", str(tmp_path), "--out", str(tmp_path / "o"), "--variants", "h999"])
    assert "unknown variant(s) ['h999']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        portrait_teacher.main(["--latents", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "is not a built world teacher folder" in capsys.readouterr().err
    # Every variant names a rope split that sums to its head width (else the model would not build).
    for _lr, density, head_dim, beta1, blocks in portrait_teacher.VARIANTS.values():
        assert head_dim // 4 + 2 * (3 * head_dim // 8) == head_dim and density in ("logit_normal", "uniform")
        assert 0 <= beta1 < 1 and min(blocks) >= 1


def test_portrait_table_rows_carry_the_i2v_column_only_for_image_to_video_models():
    from bench import portrait

    dims = {v: 0.5 for v in portrait.DIMS.values()}
    floor = {portrait.FVD: 0.6, portrait.FACE: 0.8, **dims}
    t2v = portrait.row_from("w2svd", 4, "", {portrait.FVD: 0.4, portrait.FACE: 0.5, **dims}, floor, seconds=1.0)
    i2v = portrait.row_from("w2svd", 4, "", {portrait.FVD: 0.4, portrait.FACE: 0.5, **dims, portrait.I2V: 0.9,
                                             portrait.I2V_FIRST: 0.8}, floor, seconds=1.0)
    assert "i2v" not in t2v and t2v["avg6"] == pytest.approx(0.5)
    assert i2v["i2v"] == 0.9 and i2v["avg7"] == pytest.approx((6 * 0.5 + 0.9) / 7)
    assert i2v["paper"]["i2v"] == pytest.approx(0.9763)  # the paper's W2SVD 4-step row beside ours
    assert "paper i2v" not in portrait.format_table([t2v])
    table = portrait.format_table([t2v, i2v]).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[head.index("i2v")] == "0.900" and cells[head.index("paper i2v")] == "0.976"
    assert [c.strip() for c in table[2].strip("|").split("|")][head.index("i2v")] == "—"


def test_pinned_world_uris_keep_the_part_they_were_built_with(tmp_path):
    cfg = load_config("portrait")
    vae = f"world:portrait/vae@{world.vae_key(cfg)}"
    pinned = world.pin_world_parts(cfg)
    assert pinned.model.vae == vae and pinned.model.teacher == f"world:portrait/teacher@{world.teacher_key(cfg)}"
    assert load_config("debug") == world.pin_world_parts(load_config("debug"))  # nothing to pin
    # Pinned or not, the same weights: shards encoded under either name stay compatible.
    assert encoder_ids(pinned) == encoder_ids(cfg)
    # The config's settings move on (another VAE recipe); the pinned URI still names the old part.
    moved = tmp_path / "moved.yaml"
    moved.write_text("base: portrait\nworld: {vae_steps: 7}\n")
    assert world.resolve_world_uri(f"world:{moved}/vae@{world.vae_key(cfg)}", cache_dir=tmp_path) == \
        world.resolve_world_uri("world:portrait/vae", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not built"):
        world.resolve_world_uri(f"world:{moved}/vae", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="built with settings 000000000000 is not here"):
        world.resolve_world_uri("world:portrait/vae@000000000000", cache_dir=tmp_path)
    assert world.parse_world_uri(vae) == ("portrait", "vae")


def test_an_export_records_its_world_parts_pinned(tmp_path, monkeypatch):
    from w2svd.export import CONFIG_FILE, sampler_settings_for, save_generator_export
    from w2svd.models.hunyuan import build_backbone

    monkeypatch.setenv("W2SVD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config("portrait", ["model.teacher=null"])
    folder = save_generator_export(build_backbone(cfg.model), tmp_path / "export", sampler_settings_for(cfg), cfg)
    saved = load_config(str(folder / CONFIG_FILE))
    assert saved.model.vae == f"world:portrait/vae@{world.vae_key(cfg)}"
    assert world.resolve_world_uri(saved.model.vae).parent == world.PREBUILT_DIR


def test_portrait_table_has_every_row_the_paper_compares_and_tunes_each_family_once():
    from bench import portrait

    settings = portrait.Settings()
    rows = {(s.method, s.steps, s.variant): s for s in
            [portrait.Spec.of_family(f, settings.tune_steps) for f in settings.tune_methods] + list(settings.extra)}
    for steps in (1, 4):
        for method in ("lcm" if steps == 4 else None, "dmd2", "w2svd"):
            assert method is None or (method, steps, "") in rows, (method, steps)
        for variant in ("reg", "alpha0", "alpha0.25", "alpha0.5", "alpha0.75", "shared-base"):
            assert ("w2svd", steps, variant) in rows, (steps, variant)
    assert len(rows) == len(settings.tune_methods) + len(settings.extra)  # no row twice
    shared = rows[("w2svd", 1, "shared-base")]
    # The shared-base generator is a LoRA: its own tuning family, so it takes a rate tuned for it.
    assert "method.generator=lora" in shared.overrides and shared.family in settings.tune_methods
    assert rows[("w2svd", 1, "alpha0.25")].family == "w2svd"
    assert all(s.family in settings.tune_methods for s in settings.extra)


def test_portrait_bench_refuses_a_collapse_study_of_no_points_before_building_anything(tmp_path, capsys):
    from bench import portrait

    out = tmp_path / "out"
    rc = portrait.main(["--out", str(out), "--study", "collapse", "--collapse-points", "0"])
    assert rc != 0
    assert "--collapse-points must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert portrait.main(["--out", str(out), "--study", "collapse", "--collapse-lr", "0"]) != 0
    assert "--collapse-lr must be positive, got 0.0" in capsys.readouterr().err
    assert not out.exists()


def test_a_collapse_run_keeps_one_rate_across_its_resumed_points():
    from bench import portrait
    from w2svd.iteration import Cadence

    spec = portrait.collapse_spec(portrait.Settings(), "dmd2")
    # Resumed at 60 of 120 iterations: the rate must be what it was when the first point ended at 60.
    rates = []
    for steps in (60, 120):
        cfg = load_config("portrait", [f"optim.steps={steps}", *spec.overrides])
        cadence = Cadence.from_config(cfg)
        rates.append(cadence.generator_lr_factor(cadence.updates_before(60)))
    assert rates == [1.0, 1.0] and "health.drift_action=log" in spec.overrides


def test_the_collapse_record_reads_the_guards_trace_in_generator_updates(tmp_path):
    from bench import portrait
    from pipelines.guards import Guards
    from pipelines.tracking import Tracker

    run = tmp_path / "collapse" / "dmd2"
    run.mkdir(parents=True)
    cfg = load_config("debug", ["health.drift_signal=critic_loss", "health.drift_every=4", "health.drift_warmup=0",
                                "health.drift_patience=1", "health.drift_smoothing=0", "health.drift_action=log"])
    g = Guards(cfg, str(run), None, rank=0, world=1, tracker=Tracker(None, None))
    for step, loss in enumerate([1.0] * 4 + [3.0] * 4, start=1):  # checks at 4 and 8; fires at 8
        g.observe(step, {"critic/flow_matching": loss}, data_x=None, cond_x=None, sample=None)
        assert g.check(step, {"critic/loss": loss})
    record = portrait.drift_guard_record(tmp_path, ("dmd2", "w2svd"), gen_update_every=2)
    assert record["dmd2"]["fired_at_generator_update"] == 4 and record["dmd2"]["signal"] == "critic_loss"
    assert [(p["generator_updates"], p["value"]) for p in record["dmd2"]["trace"]] == [(2, 1.0), (4, 3.0)]
    assert record["w2svd"]["fired_at_iteration"] is None and record["w2svd"]["trace"] == []  # no run: no trace
    curves = {m: [{"generator_updates": 4, "fvd_domain": 0.5, "face_rate": 0.6, "dynamic_degree": 0.0,
                   "factor_agreement": 0.7}] for m in ("dmd2", "w2svd")}
    floor = {"fvd_domain": 0.6, "face_rate": 0.8, "dynamic_degree": 0.2, "factor_agreement": 0.9}
    png = portrait.plot_collapse({"curves": curves, "floor": floor, "drift_guard": record}, tmp_path / "c.png")
    assert png.stat().st_size > 0


def test_a_stop_would_keep_the_scored_point_with_the_lowest_signal_written_by_the_firing():
    from bench import portrait

    curve = [{"generator_updates": u, "fvd_domain": f, "face_rate": 0.5} for u, f in ((30, 0.9), (60, 0.4), (90, 0.7), (120, 0.3))]
    # Checks every 25 updates: the point at 30 holds the check at 25, the one at 60 the check at 50.
    trace = [{"generator_updates": u, "signal": s} for u, s in ((25, 0.2), (50, 0.1), (75, 0.3), (100, 0.05))]
    kept = portrait.stop_would_keep(curve, {"fired_at_generator_update": 90, "trace": trace})
    assert kept == {"signal": 0.1, "generator_updates": 60, "fvd_domain": 0.4, "face_rate": 0.5}
    # The lower signal at 100 comes after the firing: a stop never sees it.
    assert portrait.stop_would_keep(curve, {"fired_at_generator_update": 120, "trace": trace})["generator_updates"] == 120
    assert portrait.stop_would_keep(curve, {"fired_at_generator_update": None, "trace": trace}) is None
    # Equal signals: the earliest checkpoint, as best_by_drift takes it.
    flat = [{"generator_updates": u, "signal": 0.1} for u in (25, 50, 75)]
    assert portrait.stop_would_keep(curve, {"fired_at_generator_update": 90, "trace": flat})["generator_updates"] == 30


def test_teacher_captions_split_keeps_training_captions_out_of_the_held_out_side():
    from w2svd.held_out import split_captions

    train = [f"caption {i}" for i in range(10)]
    candidates = ["caption 3", "new a", "caption 9", "new b", "new c"]
    seen, held_out = split_captions(train, candidates, 2)
    assert seen == [0, 5]  # evenly spaced over the training clips
    assert held_out == [1, 3]  # the first new ones, skipping captions a training clip has
    _, held_out = split_captions(train, candidates, 5)
    assert held_out == [1, 3, 4]  # fewer where too few are new
    with pytest.raises(ValueError, match="at least 1"):
        split_captions(train, candidates, 0)


def test_the_teacher_check_judges_faces_on_the_held_out_gap_not_the_report_set():
    from pipelines.evaluate import FVD_KEY
    from pipelines.world import teacher_verdict

    rows = {"real": {FVD_KEY: 0.6, "face_detection_rate": 0.8, "factor/talking": 0.7},
            "teacher-28": {FVD_KEY: 1.1, "face_detection_rate": 0.4, "factor/talking": 0.6},
            "teacher-1": {FVD_KEY: 1.0}}
    verdict = teacher_verdict(rows, {"gap": 0.06}, 28)
    # The report set's 0.4 against 0.8 does not decide: the held-out gap of 0.06 does.
    assert verdict == {"face_rate_within": True, "fvd_within_floor_factor": True,
                       "talking_agreement_at_least_real": True, "28_beats_1_step_fvd": False}
    assert not teacher_verdict(rows, {"gap": -0.11}, 28)["face_rate_within"]  # too many faces fails too
    rows["teacher-28"][FVD_KEY] = 1.3
    assert not teacher_verdict(rows, {"gap": 0.0}, 28)["fvd_within_floor_factor"]


def test_the_guard_signal_bench_measures_the_gap_the_guard_measures():
    from bench.guard_signals import projected_gap_to, spearman

    g = torch.Generator().manual_seed(0)
    ref_BCTHW = torch.randn(32, 4, 3, 8, 8, generator=g)
    pooled_BD = torch.randn(32, 6, generator=g)
    assert projected_gap_to(ref_BCTHW, ref_BCTHW, pooled_BD) == 0.0
    gaps = [projected_gap_to(ref_BCTHW, ref_BCTHW + shift, pooled_BD) for shift in (0.1, 0.5, 2.0)]
    assert 0 < gaps[0] < gaps[1] < gaps[2]
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8) and spearman([1, 2], [1, 2]) is None


def test_the_seed_summary_pairs_the_methods_ends_and_reads_what_a_stop_keeps():
    from bench.collapse_seeds import markdown, summarize

    def run(dmd2, w2svd, fired):
        curve = lambda fvds: [{"generator_updates": u, "fvd_domain": f, "face_rate": 0.5}  # noqa: E731
                              for u, f in zip((30, 60, 90), fvds)]
        trace = [{"generator_updates": u, "signal": s} for u, s in ((30, 0.1), (60, 0.2), (90, 0.3))]
        return {"curves": {"dmd2": curve(dmd2), "w2svd": curve(w2svd)},
                "drift_guard": {"dmd2": {"fired_at_generator_update": fired, "trace": trace},
                                "w2svd": {"fired_at_generator_update": None, "trace": trace}}}

    s = summarize({"s0": run((0.5, 0.7, 0.8), (0.6, 0.6, 0.5), 90), "s1": run((0.6, 0.6, 0.6), (0.7, 0.6, 0.4), 60)})
    assert s["end_dmd2_minus_w2svd"]["values"] == pytest.approx([0.3, 0.2])
    assert s["end_dmd2_minus_w2svd"]["mean"] == pytest.approx(0.25) and s["end_dmd2_minus_w2svd"]["se"] == pytest.approx(0.05)
    assert s["runs"]["s0"]["dmd2"]["stop_would_keep"]["generator_updates"] == 30  # the lowest signal by the firing
    assert s["runs"]["s0"]["dmd2"]["keep_minus_end"] == pytest.approx(-0.3) and s["runs"]["s0"]["w2svd"]["stop_would_keep"] is None
    assert s["fired"] == 2 and s["run_methods"] == 4 and s["keep_minus_end_mean"] == pytest.approx((-0.3 + 0.0) / 2)
    assert s["mean"]["w2svd"][90] == {"mean": pytest.approx(0.45), "sd": pytest.approx(0.0707, abs=1e-4), "runs": 2}
    assert "| s0 | DMD2 | 0.500 → 0.700 → 0.800 | 0.500 (30) | 0.800 | 90 | 0.500 (30) | -0.300 |" in markdown(s)
