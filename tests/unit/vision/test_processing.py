"""`ImageProcessing` gives, bit for bit, what transformers' own image processors give for
the same images (ViT: fixed resize; ConvNeXt/ResNet: shortest edge + crop_pct crop, or a
warp at 384 px and up), and refuses settings it cannot serve."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor

from serve_app.vision.images import decode_rgb
from serve_app.vision.processing import ImageProcessing
from tests.support import encoded_image

PROCESSORS = {
    "vit-64": lambda: ViTImageProcessor(size={"height": 64, "width": 64}),
    "vit-nonsquare-nearest": lambda: ViTImageProcessor(
        size={"height": 48, "width": 80}, resample=0, image_mean=[0.1, 0.2, 0.3]
    ),
    "convnext-crop": lambda: ConvNextImageProcessor(size={"shortest_edge": 64}),
    "resnet-style": lambda: ConvNextImageProcessor(
        size={"shortest_edge": 72},
        crop_pct=0.9,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),
    "convnext-warp-384": lambda: ConvNextImageProcessor(size={"shortest_edge": 384}),
    "vit-no-normalise": lambda: ViTImageProcessor(
        size={"height": 32, "width": 32}, do_normalize=False
    ),
}
IMAGES = [
    encoded_image(100, 60, "PNG", seed=1),  # landscape
    encoded_image(37, 121, "JPEG", seed=2, quality=90),  # portrait, odd sizes
    encoded_image(64, 64, "WEBP", seed=3),  # already the size
    encoded_image(9, 7, "PNG", "RGBA", seed=4),  # tiny, alpha
    encoded_image(50, 80, "PNG", "L", seed=5),  # grayscale
]


def reference_processor(name: str) -> object:
    return PROCESSORS[name]()


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_pixel_values_equal_transformers(name: str) -> None:
    processor = reference_processor(name)
    ours = ImageProcessing.from_config(processor.to_dict())
    images = [decode_rgb(data, i) for i, data in enumerate(IMAGES)]
    got = ours.pixel_values(images)
    raw = [Image.open(io.BytesIO(data)) for data in IMAGES]
    want = processor(raw, do_convert_rgb=True, return_tensors="np")["pixel_values"]
    assert got.dtype == np.float32
    assert got.shape == want.shape == (len(IMAGES), 3, *ours.output_size())
    np.testing.assert_array_equal(got, want)


def test_raw_pixels_equal_the_same_image_encoded() -> None:
    ours = ImageProcessing.from_config(reference_processor("convnext-crop").to_dict())
    data = encoded_image(90, 70, "PNG", seed=9)
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(
        ours.pixel_values([decode_rgb(array)]), ours.pixel_values([decode_rgb(data)])
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"image_processor_type": "CLIPImageProcessor"}, "not supported"),
        ({"image_processor_type": "ViTImageProcessor", "do_resize": False}, "same size"),
        (
            {"image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 64}},
            "same size",
        ),
        (
            {
                "image_processor_type": "ViTImageProcessor",
                "size": {"height": 32, "width": 32},
                "do_center_crop": True,
                "crop_size": {"height": 64, "width": 64},
            },
            "larger",
        ),
        ({"image_processor_type": "ConvNextImageProcessor", "crop_pct": 1.5}, "invalid"),
    ],
)
def test_unservable_settings_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageProcessing.from_config(config)


def test_pil_and_fast_names_map_to_the_same_kind() -> None:
    for name in ("ViTImageProcessorPil", "ViTImageProcessorFast"):
        assert ImageProcessing.from_config({"image_processor_type": name}).kind == (
            "ViTImageProcessor"
        )


@pytest.mark.parametrize(
    ("name", "size", "want"),
    [
        ("ViTImageProcessor", 32, (32, 32)),
        ("ConvNextImageProcessor", 48, (48, 48)),
    ],
)
def test_sizes_given_as_one_int(name: str, size: int, want: tuple[int, int]) -> None:
    """Older configs say `"size": 224`; transformers reads it per kind, and so do we."""
    ours = ImageProcessing.from_config({"image_processor_type": name, "size": size})
    assert ours.output_size() == want
    processor = {
        "ViTImageProcessor": ViTImageProcessor,
        "ConvNextImageProcessor": ConvNextImageProcessor,
    }[name](size=size)
    images = [decode_rgb(data, i) for i, data in enumerate(IMAGES)]
    raw = [Image.open(io.BytesIO(data)) for data in IMAGES]
    want_pixels = processor(raw, do_convert_rgb=True, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ours.pixel_values(images), want_pixels)
