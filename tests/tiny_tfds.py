"""A tiny TFDS data set, prepared offline as array_record (no TensorFlow needed): the demo images
with one caption each (`caption`) and, for every third image, a second one (`captions`).
Two configs: `all` (12 images, the default) and `half` (the first 6)."""

import json
import os

import tensorflow_datasets as tfds
from PIL import Image

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                         "demo_data")


def _records():
    with open(os.path.join(DEMO_DATA, "metadata.jsonl")) as f:
        return [json.loads(line) for line in f]


class TinyDemoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="all"), tfds.core.BuilderConfig(name="half")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,  # keep generation order: index i is image i
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "caption": tfds.features.Text(),
                "captions": tfds.features.Sequence(tfds.features.Text()),
            }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        records = _records()[:6 if self.builder_config.name == "half" else None]
        for i, record in enumerate(records):
            image = Image.open(os.path.join(DEMO_DATA, record["file_name"])).convert("RGB")
            extra = [f"another caption {i}"] if i % 3 == 0 else []
            yield i, {"image": image, "caption": record["text"],
                      "captions": [record["text"]] + extra}


def prepare(data_dir: str) -> str:
    for config in ("all", "half"):
        TinyDemoCaptions(data_dir=data_dir, config=config,
                         file_format="array_record").download_and_prepare()
    return data_dir
