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
"""Model Zoo multi-GPU unit test of the usf_mae bundle: train.json + multi_gpu_train.json under torchrun.

One process per GPU (NCCL); on a machine without GPUs two processes on the CPU (Gloo), which is how the usfmae
repository runs it in its CI (``USF_MAE_BUNDLE_ROOT`` points at a copy of the bundle). Model Zoo layout:
``ci/unit_tests/test_usf_mae_dist.py``, bundle in ``models/usf_mae``.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from monai.bundle import ConfigParser

BUNDLE_ROOT = os.environ.get("USF_MAE_BUNDLE_ROOT", "models/usf_mae")

TINY = {
    "image_size": 32,
    "network_def#hidden_size": 48,
    "network_def#num_layers": 2,
    "network_def#num_heads": 3,
    "num_workers": 0,
    "batch_size": 2,
    "precision": "fp32",
    "train#trainer#max_epochs": 1,
}


class TestUsfMaeMGPU(unittest.TestCase):
    def setUp(self):
        from usfmae_core.data import phantom

        self.work = tempfile.mkdtemp()
        self.dataset_dir = os.path.join(self.work, "labelled")
        phantom.write_labelled_folder(Path(self.dataset_dir), n_per_class=6, size=40, seed=0)
        self.meta_file = os.path.join(self.work, "metadata.json")
        shutil.copy(os.path.join(BUNDLE_ROOT, "configs", "metadata.json"), self.meta_file)

    def tearDown(self):
        shutil.rmtree(self.work)

    def test_train_mgpu_config(self):
        override = {
            **TINY,
            "bundle_root": BUNDLE_ROOT,
            "dataset_dir": self.dataset_dir,
            "output_dir": os.path.join(self.work, "eval"),
            "ckpt_dir": os.path.join(self.work, "models"),
            "metadata_file": self.meta_file,
        }
        config_files = [os.path.join(BUNDLE_ROOT, "configs", f"{c}.json") for c in ("train", "multi_gpu_train")]
        parser = ConfigParser()
        parser.read_config(config_files)
        parser.update(pairs=override)
        merged = os.path.join(self.work, "train_override.json")
        ConfigParser.export_config_file(parser.config, merged, indent=4)
        logging_file = os.path.join(BUNDLE_ROOT, "configs", "logging.conf")
        # (its properties are checked inside the run: DistributedSampler needs the process group torchrun sets up)

        n_proc = torch.cuda.device_count() if torch.cuda.device_count() > 1 else 2
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc_per_node={n_proc}",
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            merged,
            "--meta_file",
            self.meta_file,
            "--logging_file",
            logging_file,
        ]
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (BUNDLE_ROOT, env.get("PYTHONPATH")) if p)
        subprocess.check_call(cmd, env=env)
        state = torch.load(os.path.join(self.work, "models", "model.pt"), map_location="cpu", weights_only=True)
        self.assertIn("head.weight", state)
        self.assertFalse(any(k.startswith("module.") for k in state))


if __name__ == "__main__":
    unittest.main()
