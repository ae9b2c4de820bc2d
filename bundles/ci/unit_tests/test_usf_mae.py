# Copyright (c) USF-MAE toolkit contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Model Zoo unit tests of the usf_mae bundle: train, evaluate and inference configs on generated ultrasound.

Laid out for the Model Zoo (``ci/unit_tests/test_usf_mae.py``, run from the model-zoo root by
``python ci/unit_tests/runner.py --b usf_mae`` with the bundle in ``models/usf_mae``); the usfmae repository keeps
them in ``bundles/ci/unit_tests/`` and runs them in its CI on a copy of the bundle (``USF_MAE_BUNDLE_ROOT``).
Outputs, weights and the metadata the training run rewrites go to a temporary folder, not into the bundle.
"""

import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path

from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = os.environ.get("USF_MAE_BUNDLE_ROOT", "models/usf_mae")

# a 2-block, 48-wide ViT at 32 px: the bundle's configs with a CPU-sized network
TINY = {
    "image_size": 32,
    "network_def#hidden_size": 48,
    "network_def#num_layers": 2,
    "network_def#num_heads": 3,
    "num_workers": 0,
    "batch_size": 4,
    "precision": "fp32",
}


def test_order(test_name1, test_name2):
    def get_order(name):
        if "train" in name:
            return 1
        if "eval" in name:
            return 2
        if "infer" in name:
            return 3
        return 4

    return get_order(test_name1) - get_order(test_name2)


def check_workflow(workflow, check_properties=False):
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()


class TestUsfMae(unittest.TestCase):
    # one temporary folder for the whole class: inference uses the weights that training wrote
    @classmethod
    def setUpClass(cls):
        from usfmae_core.data import phantom

        cls.work = tempfile.mkdtemp()
        cls.dataset_dir = os.path.join(cls.work, "labelled")
        phantom.write_labelled_folder(Path(cls.dataset_dir), n_per_class=6, size=40, seed=0)
        cls.images_dir = os.path.join(cls.work, "images")
        os.makedirs(cls.images_dir)
        phantom.write_volume(os.path.join(cls.images_dir, "volume.nii.gz"), phantom.make_volume(1, (6, 40, 40), 1))
        for name in sorted(os.listdir(cls.dataset_dir))[:2]:
            first = min(os.listdir(os.path.join(cls.dataset_dir, name)))
            shutil.copy(os.path.join(cls.dataset_dir, name, first), os.path.join(cls.images_dir, f"{name}_{first}"))
        cls.meta_file = os.path.join(cls.work, "metadata.json")
        shutil.copy(os.path.join(BUNDLE_ROOT, "configs", "metadata.json"), cls.meta_file)
        cls.override = {
            **TINY,
            "bundle_root": BUNDLE_ROOT,
            "output_dir": os.path.join(cls.work, "eval"),
            "ckpt_dir": os.path.join(cls.work, "models"),
            "metadata_file": cls.meta_file,
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work)

    def _workflow(self, workflow_type, configs, **override):
        files = [os.path.join(BUNDLE_ROOT, "configs", f"{c}.json") for c in configs]
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=files[0] if len(files) == 1 else files,
            logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
            meta_file=self.meta_file,
            **self.override,
            **override,
        )

    def test_train_eval_config(self):
        trainer = self._workflow("train", ["train"], dataset_dir=self.dataset_dir, **{"train#trainer#max_epochs": 2})
        check_workflow(trainer, check_properties=True)
        self.assertTrue(os.path.exists(os.path.join(self.work, "models", "model.pt")))
        with open(self.meta_file) as f:
            pred = json.load(f)["network_data_format"]["outputs"]["pred"]
        self.assertEqual(list(pred["channel_def"].values()), sorted(os.listdir(self.dataset_dir)))

        # evaluate.json overrides train.json, so the workflow type stays "train"
        validator = self._workflow("train", ["train", "evaluate"], dataset_dir=self.dataset_dir, bootstrap=20)
        check_workflow(validator, check_properties=True)
        with open(os.path.join(self.work, "eval", "metrics.json")) as f:
            metrics = json.load(f)
        self.assertTrue(0.0 <= metrics["f1_macro"] <= 1.0)

    def test_infer_config(self):
        inferrer = self._workflow("infer", ["inference"], dataset_dir=self.images_dir)
        check_workflow(inferrer, check_properties=True)
        with open(os.path.join(self.work, "eval", "predictions.json")) as f:
            results = json.load(f)["results"]
        self.assertEqual(len(results), 3)
        volume = next(r for r in results if r["source"].endswith("volume.nii.gz"))
        self.assertEqual((volume["kind"], volume["n_frames"]), ("volume", 6))


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
