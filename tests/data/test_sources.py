"""data/sources.py: one dict of data openers both methods read, and the evaluation-only sources."""

import ml_collections
import numpy as np
import pytest

from lqae_vlap.data import sources
from lqae_vlap.data.captions import DigitCaptions
from lqae_vlap.data.vqa_source import DigitQuestions


def data(name="digits"):
    return ml_collections.ConfigDict(dict(name=name, train_path="", eval_path="", data_dir="",
                                          manual_dir=""))


def test_digits_serve_both_methods():
    splits = sources.open_sources(data(), 16)
    assert set(splits) == {"train", "validation", "train_eval", "images"}
    train, val = splits["train"], splits["validation"]
    assert isinstance(train, DigitCaptions) and (len(train), len(val)) == (1500, 297)
    # Defaults: evaluations read the training split as it is, images are the held-out split.
    assert splits["train_eval"] is train and splits["images"] is val
    example = val[3]
    assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
    # Labelled (LQAE's evaluations) and captioned (VLAP) at once.
    assert val.class_names[int(example["label"])] in example["caption"]


def test_names_are_checked_against_the_dict_and_the_method():
    with pytest.raises(ValueError, match="config.data.name='laion' is not known"):
        sources.open_sources(data("laion"), 16)
    with pytest.raises(ValueError, match="'imagenet' lacks what this method trains on"):
        sources.open_sources(data("imagenet"), 16, supported=("digits", "jsonl"))
    with pytest.raises(ValueError, match="needs config.data.train_path"):
        sources.open_sources(data("cc3m"), 16)


def test_evaluation_source_can_be_a_held_out_split_of_the_training_data():
    """eval.source named as config.data (digit scenes' test split) is that split of the
    training data's own splits, not the validation images; unknown splits are one clear error."""
    d = ml_collections.ConfigDict(dict(name="digit_scenes", scenes=dict(
        num_train=40, num_validation=20, num_test=30, seed=0, two_digit_fraction=0.75)))
    own = sources.open_sources(d, 32)
    test = sources.eval_images(ml_collections.ConfigDict(dict(name="digit_scenes", split="test")),
                               d, own)
    assert test is own["test"] and len(test) == 30 and own["images"] is own["validation"]
    assert not np.array_equal(test[3]["image"], own["validation"][3]["image"])
    assert sources.eval_images(ml_collections.ConfigDict(dict(name="digit_scenes", split="")),
                               d, own) is own["validation"]
    for bad in ("train", "val"):
        with pytest.raises(ValueError, match=f"split='{bad}'.*use one of"):
            sources.eval_images(ml_collections.ConfigDict(dict(name="digit_scenes", split=bad)),
                                d, own)


def test_evaluation_sources():
    none = ml_collections.ConfigDict(dict(name="", split="", path=""))
    assert sources.eval_images(none, data()) is None
    with pytest.raises(ValueError, match="config.eval.source.name='flickr'"):
        sources.eval_images(ml_collections.ConfigDict(dict(name="flickr")), data())
    vqa = ml_collections.ConfigDict(dict(source="digits", questions="", annotations="",
                                         image_dir=""))
    questions = sources.vqa_questions(vqa, 16)
    assert isinstance(questions, DigitQuestions) and len(questions) == 297
    vqa.source = ""
    assert sources.vqa_questions(vqa, 16) is None
    vqa.source = "gqa"
    with pytest.raises(ValueError, match="config.eval.vqa.source='gqa' is not known"):
        sources.vqa_questions(vqa, 16)
    # Few-shot VQA's solved examples: the digits' train split; for the datasets, train files.
    vqa.source, vqa.shots = "digits", 0
    assert sources.vqa_shot_pool(vqa, 16) is None
    vqa.shots = 2
    pool = sources.vqa_shot_pool(vqa, 16)
    assert isinstance(pool, DigitQuestions) and pool.split == "train" and len(pool) > 297
    vqa.update(dict(source="okvqa", shot_questions="q.json", shot_annotations="",
                    shot_image_dir=""))
    with pytest.raises(ValueError, match="shots=2 needs.*vqa.shot_annotations, shot_image_dir"):
        sources.vqa_shot_pool(vqa, 16)


def test_captioning_and_retrieval_sources(tmp_path):
    from tests.helpers import write_karpathy, write_nocaps

    section = ml_collections.ConfigDict(dict(source="", annotations="", image_dir="",
                                             split="test"))
    assert sources.captioning_images(section, data()) is None
    assert sources.retrieval_images(section, data()) is None
    section.source = "coco_karpathy"
    with pytest.raises(ValueError, match="config.eval.captioning.source='coco_karpathy'"):
        sources.captioning_images(section, data())
    with pytest.raises(ValueError, match="config.eval.retrieval.source='coco_karpathy'"):
        sources.retrieval_images(section, data())
    section.source = "nocaps"
    with pytest.raises(FileNotFoundError, match="NoCaps annotations: no file given"):
        sources.captioning_images(section, data())
    section.annotations, section.image_dir = map(str, write_nocaps(tmp_path / "n"))
    nocaps = sources.captioning_images(section, data())
    assert len(nocaps) == 6 and nocaps.name == "captioning" and nocaps[0]["domain"]
    for dataset in ("flickr30k", "coco"):
        section.source = dataset
        section.annotations, section.image_dir = map(str, write_karpathy(tmp_path / dataset,
                                                                         dataset))
        split = sources.retrieval_images(section, data())
        assert len(split) == 6 and len(split[5]["references"]) == 5
