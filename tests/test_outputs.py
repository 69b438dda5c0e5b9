"""outputs.save_run: the run folder appears whole or not at all, also when one of its writer threads fails; the
GIFs hold every frame.

Oracle: the folder listing before and after; Pillow reading the written files back.
"""
import os

import numpy as np
import pytest
from PIL import Image

import outputs


def frames(f=5, h=24, w=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(x * 6 + 9 * k) % 256, (y * 10) % 256, np.full_like(x, 40 * k % 256)], -1)
                     for k in range(f)]).astype(np.uint8)


def test_save_run_writes_every_file(tmp_path):
    folder = outputs.save_run(str(tmp_path), "run", frames(), {"seed": 3}, workers=3)
    assert sorted(os.listdir(folder)) == ["frames", "run.json", "video.gif"]
    assert sorted(os.listdir(os.path.join(folder, "frames"))) == [f"{k:04d}.png" for k in range(5)]
    png = np.asarray(Image.open(os.path.join(folder, "frames", "0003.png")))
    assert np.array_equal(png, frames()[3])  # lossless
    gif = Image.open(os.path.join(folder, "video.gif"))
    assert gif.n_frames == 5 and gif.size == (40, 24)
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder left


@pytest.mark.parametrize("failing", ["0003.png", "video.gif"])
def test_a_failing_writer_thread_leaves_no_run_folder(tmp_path, monkeypatch, failing):
    """One image's encoder fails in its thread (a full disk, say): the error reaches the caller, no run folder
    appears and the temporary folder is gone; an earlier run of the same name is kept."""
    keep = outputs.save_run(str(tmp_path), "run", frames(), {"seed": 1})
    real_save = Image.Image.save

    def save(im, fp, *args, **kwargs):
        if str(fp).endswith(failing):
            raise OSError(28, "No space left on device")
        return real_save(im, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="No space left"):
        outputs.save_run(str(tmp_path), "run", frames(), {"seed": 2}, workers=4)
    assert os.listdir(tmp_path) == ["run"]  # only the earlier run: no half folder, no ".run.*" temporary
    assert '"seed": 1' in open(os.path.join(keep, "run.json")).read()
