"""Packages for setuptools (everything else is in pyproject.toml).

The wheel carries the MONAI bundle ``bundles/usf_mae`` as ``usfmae_core.bundle_template``: the template that
``usfmae export-bundle`` fills in, so that the installed package can write a complete bundle. That mapping needs
``package_dir`` beside automatic discovery, which pyproject.toml alone cannot express. A source checkout or an
editable install finds the bundle in place (:func:`usfmae_core.bundle_export.template_dir`).
"""

from setuptools import find_packages, setup

TEMPLATE = "usfmae_core.bundle_template"
TEMPLATE_DATA = {"": ["LICENSE", "large_files.yml"], "configs": ["*.json", "*.yaml", "*.conf"], "docs": ["*"],
                 "models": ["README.md"]}

setup(
    packages=[*find_packages(include=["usfmae_core", "usfmae_core.*"]),
              *(f"{TEMPLATE}.{sub}" if sub else TEMPLATE for sub in TEMPLATE_DATA)],
    package_dir={TEMPLATE: "bundles/usf_mae"},
    package_data={f"{TEMPLATE}.{sub}" if sub else TEMPLATE: files for sub, files in TEMPLATE_DATA.items()},
)
