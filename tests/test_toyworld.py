"""The toy world: the renderer draws each object in its box, captions, the colour detector, boxes and
layouts, the video-level score, and reproducible sampling.

What to read: toyworld.py; `lvd-method.md` §7.

Oracles: the scene's own geometry (boxes, analytic areas and centroids of a disc, square and upright
triangle); hand-written caption strings; layout.Layout's interpolation and save/load.

Glossary: F (frames), O (objects), H, W (frame height, width), s (half-size), xyxy (normalised corners).
"""
import numpy as np
import pytest
import torch

import attention
import layout as L
import toyworld as T


def _scenes(n=12, frames=16, seed=0):
    rng = np.random.default_rng(seed)
    return [T.sample_scene(rng, frames=frames, n_objects=1 + i % 3) for i in range(n)]


def _overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_render_draws_each_object_in_its_box():
    H = W = 96
    checked_area = 0
    for scene in _scenes():
        video = T.render(scene, scene.frames, H, W)
        assert video.shape == (scene.frames, H, W, 3) and video.dtype == np.uint8
        boxes = T.scene_boxes(scene)
        centres = np.stack([o.centre(T.frame_times(scene.frames)) for o in scene.objects])   # (O, F, 2)
        for i, obj in enumerate(scene.objects):
            for k in range(scene.frames):
                x0, y0, x1, y1 = boxes[i, k]
                occluded = any(_overlaps(boxes[i, k], boxes[j, k]) for j in range(i + 1, len(scene.objects)))
                d = T.detect(video[k], obj.colour)
                if occluded and d is None:
                    continue
                assert d is not None, (obj, k)
                cy, cx, area = d
                assert x0 <= cx <= x1 and y0 <= cy <= y1, (obj, k, d, boxes[i, k])
                if occluded:
                    continue
                checked_area += 1
                assert area == pytest.approx(T.expected_area(obj.shape, obj.size), rel=0.12), (obj, k)
                ex, ey = centres[i, k]
                ey = ey + obj.size / 3 if obj.shape == "triangle" else ey     # a triangle's centroid
                assert abs(cx - ex) < 1.5 / W and abs(cy - ey) < 1.5 / H, (obj, k, d)
    assert checked_area > 200                                                # most frames are unoccluded


def test_render_layers_later_objects_over_earlier_and_stretches_with_the_frame():
    a = T.Obj("square", "red", 0.2, (0.5, 0.5), (0.5, 0.5))
    b = T.Obj("ball", "blue", 0.1, (0.5, 0.5), (0.5, 0.5))
    v = T.render(T.Scene((a, b), 1), 1, 40, 80)
    assert tuple(v[0, 20, 40]) == T.COLOURS["blue"] and tuple(v[0, 20, 30]) == T.COLOURS["red"]
    assert tuple(v[0, 0, 0]) == T.BACKGROUND
    v = T.render(T.Scene((b, a), 1), 1, 40, 80)
    assert T.detect(v[0], "blue") is None                                    # fully covered
    assert T.detect(v[0], "red")[2] == pytest.approx(T.expected_area("square", 0.2), rel=0.05)
    ball = T.render(T.Scene((b,), 1), 1, 40, 80)[0]                        # an ellipse: 16 columns, 8 rows
    rows, cols = np.nonzero((ball == T.COLOURS["blue"]).all(-1))
    assert cols.max() - cols.min() + 1 == 16 and rows.max() - rows.min() + 1 == 8
    assert T.detect(torch.from_numpy(ball), "blue")[2] == pytest.approx(T.expected_area("ball", 0.1), rel=0.1)


def test_captions():
    def o(shape, colour, start, end=None):
        return T.Obj(shape, colour, 0.1, start, start if end is None else end)
    cases = [
        ((o("ball", "red", (0.2, 0.5), (0.8, 0.5)),), "a red ball moving from the left to the right"),
        ((o("ball", "red", (0.8, 0.4), (0.2, 0.6)),), "a red ball moving from the right to the left"),
        ((o("triangle", "green", (0.5, 0.2), (0.6, 0.8)),), "a green triangle moving from the top to the bottom"),
        ((o("square", "blue", (0.3, 0.8), (0.4, 0.3)),), "a blue square moving from the bottom to the top"),
        ((o("square", "blue", (0.3, 0.3)), o("triangle", "green", (0.7, 0.7))), "a blue square and a green triangle"),
        ((o("square", "blue", (0.3, 0.3), (0.33, 0.35)),), "a blue square"),                # barely moves
        ((o("ball", "red", (0.2, 0.2), (0.8, 0.2)), o("square", "blue", (0.5, 0.5)),
          o("triangle", "green", (0.5, 0.9), (0.5, 0.3))),
         "a red ball moving from the left to the right, a blue square and "
         "a green triangle moving from the bottom to the top"),
    ]
    for objs, want in cases:
        assert T.caption(T.Scene(objs)) == want


def test_detect_absent_colour_and_tolerance():
    scene = T.Scene((T.Obj("ball", "red", 0.15, (0.3, 0.3), (0.3, 0.3)),), 1)
    frame = T.render(scene, 1, 64, 64)[0]
    assert T.detect(frame, "blue") is None and T.detect(frame, "green") is None
    noisy = np.clip(frame.astype(int) + np.random.default_rng(0).integers(-25, 26, frame.shape), 0, 255)
    d0, d1 = T.detect(frame, "red"), T.detect(noisy.astype(np.uint8), "red")
    assert d1 is not None and np.allclose(d0, d1, atol=0.01)
    assert d0[0] == pytest.approx(0.3, abs=0.01) and d0[1] == pytest.approx(0.3, abs=0.01)
    tiny = T.Scene((T.Obj("ball", "red", 0.02, (0.5, 0.5), (0.5, 0.5)),), 1)
    assert T.detect(T.render(tiny, 1, 64, 64)[0], "red", min_pixels=20) is None   # 5 pixels: too few


def test_score_passes_own_boxes_and_fails_mirrored():
    mover = T.Obj("triangle", "red", 0.1, (0.15, 0.4), (0.85, 0.45))
    still = T.Obj("square", "blue", 0.1, (0.5, 0.8), (0.5, 0.8))
    scene = T.Scene((mover, still), 16)
    video = T.render(scene, 16, 64, 64)
    r = T.score(video, scene)
    assert r["passed"] and all(o["fraction"] == 1.0 for o in r["objects"])
    assert [o["name"] for o in r["objects"]] == ["red triangle", "blue square"]
    boxes = T.scene_boxes(scene)
    mirrored = boxes.copy()
    mirrored[..., [0, 2]] = 1 - boxes[..., [2, 0]]                     # x0' = 1 − x1, x1' = 1 − x0
    r = T.score(video, (mirrored, ["red", "blue"]))
    assert not r["passed"]
    assert not r["objects"][0]["passed"] and r["objects"][0]["fraction"] < 0.3
    assert r["objects"][1]["passed"]                                   # the centred square mirrors onto itself
    shifted = boxes.copy()
    shifted[1, :, [0, 2]] -= 0.3
    r = T.score(video, (shifted, ["red", "blue"]))
    assert not r["passed"] and r["objects"][0]["passed"] and not r["objects"][1]["passed"]
    assert not T.score(video[::-1].copy(), scene)["passed"]            # played backwards
    with pytest.raises(ValueError):
        T.score(video, (boxes, ["red", "red"]))


def test_score_passes_random_clean_renders():
    for scene in _scenes(seed=1):
        assert T.score(T.render(scene, scene.frames, 64, 64), scene)["passed"], scene


def test_to_layout_round_trips(tmp_path):
    for scene in _scenes(n=6, seed=2):
        lay = T.to_layout(scene, "a prompt")
        lay.save(tmp_path / "l.json")
        back = L.Layout.load(tmp_path / "l.json")
        assert back.frames == lay.frames and back.prompt == "a prompt" and back.background == "grey"
        assert [n for _, n in back.objects()] == [o.name for o in scene.objects]
        for frames in (16, 11):
            tracks = back.object_boxes(frames)
            got = np.stack([t.boxes for t in tracks])                        # (O, F, 4)
            want = T.scene_boxes(scene, frames)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1.01 / L.CANVAS                 # all frames: the path is linear
            if frames == 16:                                                   # video frames 0, 3, …, 15 are keyframes
                assert np.abs(got[:, ::3] - want[:, ::3]).max() <= 0.5 / L.CANVAS + 1e-5
    assert T.to_layout(scene).prompt == T.caption(scene)


def test_scene_boxes_feed_layer_masks():
    scene = _scenes(n=3, frames=4, seed=3)[2]
    boxes = T.scene_boxes(scene)
    assert boxes.shape == (3, 4, 4) and (boxes >= 0).all() and (boxes <= 1).all()
    masks = attention.layer_masks(boxes, (16, 16), paths=attention.GUIDED_LAYERS[:1])
    m = next(iter(masks.values()))
    assert m.shape[:2] == (3, 4) and (m.sum((-2, -1)) > 0).all()


def test_sampling_is_reproducible_and_valid():
    a = [T.sample_scene(np.random.default_rng(7), frames=8) for _ in range(2)]
    assert a[0] == a[1]
    many = [T.sample_scene(np.random.default_rng(s)) for s in range(40)]
    assert len(set(many)) > 30
    assert {len(s.objects) for s in many} == {1, 2, 3}
    for s in many:
        assert len({o.colour for o in s.objects}) == len(s.objects)
        b = T.scene_boxes(s)
        assert (b >= 0).all() and (b <= 1).all()
    moving = [o for s in many for o in s.objects if T.direction(o)]
    assert moving and all(np.hypot(*np.subtract(o.end, o.start)) >= 0.35 for o in moving)
    with pytest.raises(ValueError):
        T.sample_scene(np.random.default_rng(0), n_objects=4)
