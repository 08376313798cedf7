"""NVRx's usage-guide integration example, with only its imports changed to memckpt's.

Run: ``python nvrx_guide_example.py CKPT_DIR LAST_ITERATION``. The lines between the
markers are the guide's ("Integration Overview"); the lines outside fill in what the
guide leaves to the reader (model, training step, save condition, loop end) and print
what the test checks.
"""

import json
import sys

import torch

from memckpt.adapters.nvrx import BasicTensorAwareStateDict, LocalCheckpointManager

ckpt_dir = sys.argv[1]
last_iteration = int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
found = None


def save_condition() -> bool:
    return iteration % 5 == 0


# -- the guide's code (imports above changed from nvidia_resiliency_ext) --------------------
# Initialize CheckpointManager with the checkpoint directory
ckpt_manager = LocalCheckpointManager(ckpt_dir)

# Load the latest checkpoint if available
iteration = ckpt_manager.find_latest()
if iteration != -1:
    ta_state_dict, ckpt_part_id = ckpt_manager.load()
    # Use the loaded state_dict to resume training
    model.load_state_dict(ta_state_dict.state_dict)
    found = [iteration, list(ckpt_part_id), model.weight.sum().item()]
else:
    # An iteration value of -1 indicates that no local checkpoint was found.
    # In this case, either return an error or initialize the model from scratch.
    print("Starting training from scratch")

# Training loop
while True:
    # Perform a training iteration
    iteration = max(iteration, 0) + 1
    with torch.no_grad():
        model.weight.add_(0.01 * iteration)
    state_dict = model.state_dict()

    # Save checkpoint if conditions are met
    if save_condition():
        ta_state_dict = BasicTensorAwareStateDict(state_dict)
        ckpt_manager.save(ta_state_dict, iteration, is_async=False)
        if iteration == last_iteration:
            break
# -- end of the guide's code ----------------------------------------------------------------

print(json.dumps({"found": found, "saved": iteration, "weight_sum": model.weight.sum().item()}))
