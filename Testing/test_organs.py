"""Choosing organs (``predict --organs``, ``segment(..., organs=...)``): a class-bound model decodes only the chosen
organs' queries, and only the chosen organs are written, whatever the format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from masksam_core.cli_util import run_cli
from masksam_core.errors import InputError
from masksam_core.inference.organs import resolve_organs
from masksam_core.model.card import ModelCard
from masksam_core.model.masksam import MaskSAM

CLASSES = ["liver", "spleen", "kidney_left"]


def _model(folder, matching):
    from masksam_core.model.__main__ import main

    assert main(["init", "--classes", ",".join(CLASSES), "--out", str(folder), "--slab-depth", "2",
                 "--num-queries", "5", "--spacing", "6,6,6"]) == 0
    card = json.loads((folder / "model.json").read_text())
    card["training"]["matching"] = matching
    card["inference"] = {"background_threshold": 0.5}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def class_bound(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("models") / "bound", "class_bound")


@pytest.fixture(scope="module")
def hungarian(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("models") / "hungarian", "hungarian")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    arr = np.full((4, 40, 48), -1000, np.float32)  # 3 slabs: the model runs slowly on a busy CPU
    arr[:, 6:34, 4:44] = 40
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 5.0))
    img.SetOrigin((10.0, -20.0, 33.0))
    path = tmp_path_factory.mktemp("vol") / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_names_are_the_cards_case_insensitive_and_display_names_work(class_bound):
    card = ModelCard.read(class_bound)
    chosen = resolve_organs(card, ["Kidney_Left", "LIVER", "left kidney", "Left-Kidney"])
    assert [e["name"] for e in chosen] == ["liver", "kidney_left"]  # label order, no repeats
    assert resolve_organs(card, None) is None
    assert [e["name"] for e in resolve_organs(card, "spleen,liver")] == ["liver", "spleen"]
    with pytest.raises(InputError) as info:
        resolve_organs(card, ["liver", "livr", "heart"])
    message = str(info.value)
    assert "unknown organs 'livr', 'heart'" in message and "its organs are: liver, spleen, kidney_left" in message
    assert len(message.splitlines()) == 1
    with pytest.raises(InputError, match="at least one"):
        resolve_organs(card, " , ")


class _Spy:
    """Records, for each slab, the queries MaskSAM decoded and the skip list and prior it was given."""

    def __init__(self, monkeypatch):
        self.decoded, self.priors = set(), []
        original = MaskSAM.forward_features

        def spy(model, *args, **kwargs):
            out = original(model, *args, **kwargs)
            self.decoded |= set(np.nonzero(out["decoded"].cpu().numpy().any(axis=0))[0].tolist())
            if kwargs.get("prior") is not None:
                self.priors.append(kwargs["prior"]["present"].cpu().numpy())
            return out

        monkeypatch.setattr(MaskSAM, "forward_features", spy)


def _segment(model_dir, volume, organs=None, **options):
    from masksam_core import InferenceOptions, load_model, segment

    model, card = load_model(model_dir)
    opts = InferenceOptions(**{"runtime": "torch", "atlas_prior": False, "prune_empty_queries": False, **options})
    return segment(sitk.ReadImage(str(volume)), model, card, opts, organs=organs)


def test_a_class_bound_model_decodes_only_the_chosen_organs_queries(class_bound, volume, monkeypatch):
    spy = _Spy(monkeypatch)
    _, info = _segment(class_bound, volume)
    assert spy.decoded == {1, 2, 3, 4}  # every query but the background's (query 4 answers no class)
    all_pairs = info["engine_stats"]["decoded_queries"]
    spy.decoded.clear()
    _, info = _segment(class_bound, volume, organs=["Spleen"])
    assert spy.decoded == {2}  # query c answers class c: spleen's only
    assert info["engine_stats"]["decoded_queries"] * 4 == all_pairs
    assert info["engine_stats"]["skipped_queries"] == [0, 1, 3, 4]
    assert info["labels"] == {"2": "spleen"} and set(info["organs"]) <= {"spleen"}
    assert info["organ_selection"]["organs"] == ["spleen"] and "only the chosen" in info["organ_selection"]["decoding"]
    assert info["options"]["organs"] == ["Spleen"]


def test_under_the_atlas_prior_only_the_chosen_organs_are_prompted(class_bound, volume, monkeypatch):
    import masksam_core.inference.engine as engine

    def fake_prior(vol, model, options):  # a registered atlas holding all three organs
        prior = np.zeros(vol.region.shape, np.uint8)
        thirds = np.array_split(np.arange(prior.shape[2]), 3)
        for value, xs in zip((1, 2, 3), thirds):
            prior[:, :, xs[0]:xs[-1] + 1] = value
        return prior

    monkeypatch.setattr(engine, "prior_labels", fake_prior)
    spy = _Spy(monkeypatch)
    _segment(class_bound, volume, atlas_prior=True)
    assert spy.decoded == {1, 2, 3} and any(p[..., 1].any() for p in spy.priors)
    spy.decoded.clear()
    spy.priors.clear()
    labels, _ = _segment(class_bound, volume, organs=["liver", "kidney_left"], atlas_prior=True)
    assert spy.decoded == {1, 3}
    assert spy.priors and not any(p[..., 2].any() for p in spy.priors)  # spleen's prompts: none
    assert not (sitk.GetArrayFromImage(labels) == 2).any()  # nor the prior blended into the scores


def _fake_scores(monkeypatch):
    """Replace the slab loop's output with scores where organ k wins the k-th third of the body along x and
    spleen is second everywhere: what is written then shows the choice exactly."""
    import masksam_core.inference.engine as engine

    def run(self, region, pad_value, progress=None, prior=None, prior_pad_px=5.0):
        c = self.model.num_classes
        probs = np.zeros((c,) + region.shape, np.float32)
        probs[0] = 0.5
        probs[2] = 0.6
        for value, xs in zip((1, 2, 3), np.array_split(np.arange(region.shape[2]), 3)):
            probs[value][:, :, xs] = 0.9
        return probs

    monkeypatch.setattr(engine.SlabEngine, "run", run)


@pytest.mark.parametrize("kind", ["class_bound", "hungarian"])
def test_only_the_chosen_organs_are_written(kind, class_bound, hungarian, volume, monkeypatch):
    _fake_scores(monkeypatch)
    model_dir = {"class_bound": class_bound, "hungarian": hungarian}[kind]
    everything = sitk.GetArrayFromImage(_segment(model_dir, volume)[0])
    assert set(np.unique(everything)) == {0, 1, 2, 3}
    labels, info = _segment(model_dir, volume, organs=["liver"])
    labels = sitk.GetArrayFromImage(labels)
    assert set(np.unique(labels)) == {0, 1} and info["labels"] == {"1": "liver"} and list(info["organs"]) == ["liver"]
    if kind == "hungarian":  # every query decoded, the output filtered: liver exactly as in the full run
        assert np.array_equal(labels == 1, everything == 1)
        assert "filtered" in info["organ_selection"]["decoding"]
    else:  # the other organs' channels are not there to compete: liver where it beats the background
        assert ((everything == 1) <= (labels == 1)).all()


def _predict(argv, capsys):
    from masksam_core.predict import main

    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_organs_writes_only_them_in_every_format(class_bound, volume, tmp_path, capsys, monkeypatch):
    import slicerio

    _fake_scores(monkeypatch)
    for name in ("organs.nii.gz", "organs.seg.nrrd"):
        out = tmp_path / name
        code, stdout, err = _predict(["-i", str(volume), "-o", str(out), "--model", str(class_bound),
                                      "--runtime", "torch", "--organs", "SPLEEN,kidney_left"], capsys)
        assert code == 0, err
        sidecar = json.loads((tmp_path / "organs.json").read_text())
        assert sidecar["labels"] == {"2": "spleen", "3": "kidney_left"}
        assert sidecar["organ_selection"]["organs"] == ["spleen", "kidney_left"]
        assert set(sidecar["organs"]) == {"spleen", "kidney_left"} and "2 organs" in stdout
        if name.endswith(".seg.nrrd"):
            seg = slicerio.read_segmentation(str(out))
            assert [s["name"] for s in seg["segments"]] == ["Spleen", "Left kidney"]
            assert set(np.unique(seg["voxels"])) == {0, 2, 3}
        else:
            assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))) == {0, 2, 3}
        (tmp_path / "organs.json").unlink()


def test_predict_organs_in_a_dicom_seg(class_bound, tmp_path, capsys, monkeypatch):
    from dicom_fixture import check_seg_references, dciodvfy_errors, write_series

    _fake_scores(monkeypatch)
    arr = np.full((6, 40, 48), -1000, np.int16)
    arr[:, 6:34, 4:44] = 40
    write_series(tmp_path / "dicom", arr)
    out = tmp_path / "seg.dcm"
    code, _, err = _predict(["-i", str(tmp_path / "dicom"), "-o", str(out), "--model", str(class_bound),
                             "--runtime", "torch", "--organs", "liver"], capsys)
    assert code == 0, err
    import pydicom

    assert [s.SegmentLabel for s in pydicom.dcmread(out).SegmentSequence] == ["Liver"]
    check_seg_references(out, tmp_path / "dicom")
    errors = dciodvfy_errors(out)
    assert errors in (None, []), errors  # None: dciodvfy is not installed (test_dicom_seg_check says so)


def test_an_unknown_organ_is_one_line_before_the_model_loads(class_bound, volume, tmp_path, capsys, monkeypatch):
    import masksam_core

    def not_now(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(masksam_core, "load_model", not_now)
    out = tmp_path / "o.nii.gz"
    code, _, err = _predict(["-i", str(volume), "-o", str(out), "--model", str(class_bound), "--organs",
                             "liver,pancreas"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "unknown organ 'pancreas'" in err and "liver, spleen, kidney_left" in err
    code, _, err = _predict(["-i", str(volume), "-o", str(out), "--model", str(class_bound), "--organs", ","],
                            capsys)
    assert code == 2 and "--organs" in err and "at least one organ" in err
    code, _, err = _predict(["--demo", "--organs", "liver"], capsys)
    assert code == 2 and "--organs does not apply to --demo" in err
