import dagster as dg

from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.defs.training.assets import training_set
from readmission_platform.lib.splitting import split_overlap


@dg.asset_check(
    asset=training_set,
    blocking=True,
    description="No patient has encounters on two sides of the train/validation/test split.",
)
def check_training_set_patient_overlap(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.open() as store:
        table = store.query("SELECT patient_nbr, split FROM training_set")
    overlap = split_overlap(table)
    leaked = overlap["patients_in_several_splits"]
    return dg.AssetCheckResult(
        passed=leaked == 0 and table.height > 0,
        description=f"{leaked} of {overlap['patients']} patients sit on more than one side of the split"
        if leaked or not table.height
        else f"{overlap['patients']} patients, each on exactly one side",
        metadata=overlap,
    )
