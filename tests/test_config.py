"""One validated configuration for the workflow and every sub-command; it reaches each job as given."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from conftest import ROOT
from prrtquant import dosimetry as D
from prrtquant.bounds import BoundsSettings
from prrtquant.cli import main
from prrtquant.config import CONFIG_SCHEMA, ConfigError, load_config, validate_config
from prrtquant.stages.ingest import IngestConfig
from prrtquant.stages.quantify import QuantifySettings
from prrtquant.stages.register import settings_from_config
from prrtquant.registration import RegistrationSettings

def test_schema_defaults_are_the_library_defaults():
    """What the workflow fills in from the schema is what a stage uses when it is given nothing."""
    cfg = validate_config({})
    assert IngestConfig.from_dict(cfg["ingest"], cfg["physical_bounds"]) == IngestConfig()
    reg, stage = settings_from_config(cfg["registration"])
    assert reg == RegistrationSettings()
    assert stage == {"mask_source": "auto", "reference_session": None, "fractional": True, "overlays": True}
    assert QuantifySettings.from_config(cfg["quantify"]) == QuantifySettings()
    assert asdict(D.settings_from_config(cfg["dosimetry"])) == asdict(D.DosimetrySettings())
    assert BoundsSettings.from_config(cfg["physical_bounds"]) == BoundsSettings()


def test_the_shipped_config_is_valid_and_the_schema_is_package_data():
    assert CONFIG_SCHEMA.is_file() and CONFIG_SCHEMA.parent.name == "data"
    cfg = load_config(ROOT / "config.yaml", require_patients=True)
    assert cfg["quantify"]["threshold"] == 3.0 and cfg["physical_bounds"]["activity_tolerance"] == 0.1
    with pytest.raises(ConfigError, match="'patients' is a required property"):
        validate_config({}, require_patients=True)


@pytest.mark.parametrize("text, message", [
    ("ingest:\n  camera_cps_per_mbq: nine\n", "ingest.camera_cps_per_mbq: 'nine' is not of type"),
    ("ingest:\n  camera_cps_per_mbq: -9.6\n", "ingest.camera_cps_per_mbq: -9.6 is less than or equal to"),
    ("ingest:\n  camera_cps_per_mbk: 9.6\n", "'camera_cps_per_mbk' was unexpected"),
    ("quantify:\n  threshold: [3]\n", "quantify.threshold"),
    ("physical_bounds:\n  activity_tolerance: 2\n", "physical_bounds.activity_tolerance: 2 is greater than"),
    ("- a list\n", "config must be a mapping"),
])
def test_every_sub_command_refuses_a_bad_config_naming_the_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    for argv in (["ingest", str(ROOT / "test_data" / "P01" / "DICOM"), "--patient", "P01"],
                 ["register", str(tmp_path)], ["quantify", str(tmp_path), str(tmp_path)],
                 ["dosimetry", str(tmp_path), str(tmp_path)]):
        assert main([*argv, "--out", str(out), "--config", str(cfg)]) == 2, argv
        err = capsys.readouterr().err
        assert str(cfg) in err and message in err, (argv, err[-500:])
        assert not out.exists()


def test_a_config_changes_the_stage_output_by_hand(processed_cohort, tmp_path):
    d = processed_cohort["P01"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quantify:\n  threshold: 10.0\n")
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(tmp_path / "q")]) == 0
    assert main(["quantify", str(d / "ingest"), str(d / "register"), "--out", str(tmp_path / "q10"), "--config",
                 str(cfg)]) == 0
    default = json.loads((tmp_path / "q" / "eligibility.json").read_text())
    strict = json.loads((tmp_path / "q10" / "eligibility.json").read_text())
    assert default["threshold"] == 3.0 and default["eligible"] is True
    assert strict["threshold"] == 10.0 and strict["eligible"] is False and strict["value"] == default["value"]


# the workflow side (``snakemake --config`` reaching a job and rerunning it) is checked at the end of
# tests/test_workflow.py::test_workflow_runs_on_bundled_cohort, on the run that test makes anyway


@pytest.mark.parametrize("column, value, message", [
    ("camera_cps_per_mbq", "abc", "camera_cps_per_mbq: 'abc' does not match"),
    ("camera_cps_per_mbq", "-9.6", "camera_cps_per_mbq: '-9.6' does not match"),
    ("treated_lobe", "middle", "treated_lobe: 'middle' is not one of"),
    ("design", "whole_liver", "design: 'whole_liver' is not one of"),
])
def test_by_hand_ingest_validates_the_sheet_like_the_workflow(tmp_path, capsys, column, value, message):
    """The sheet schema of the workflow is the by-hand ingest's too: a bad value is named, nothing written."""
    import pandas as pd

    sheet = pd.read_csv(ROOT / "test_data" / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet.loc[sheet.patient == "P01", column] = value
    path = tmp_path / "patients.tsv"
    sheet.to_csv(path, sep="\t", index=False)
    out = tmp_path / "ingest"
    assert main(["ingest", str(ROOT / "test_data" / "P01" / "DICOM"), "--out", str(out), "--patient", "P01",
                 "--sheet", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "patient P01" in err and message in err, err[-400:]
    assert not out.exists()


def test_duplicate_pseudonyms_are_refused(tmp_path, capsys):
    import pandas as pd

    from prrtquant.config import check_unique_patients

    sheet = pd.read_csv(ROOT / "test_data" / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    path = tmp_path / "patients.tsv"
    pd.concat([sheet, sheet[sheet.patient == "P02"]]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ConfigError, match=r"\['P02'\] appear more than once"):
        check_unique_patients(pd.read_csv(path, sep="\t", dtype=str).patient, str(path))
    assert main(["ingest", str(ROOT / "test_data" / "P02" / "DICOM"), "--out", str(tmp_path / "i"), "--patient", "P02",
                 "--sheet", str(path)]) == 2
    assert "2 rows for patient 'P02'" in capsys.readouterr().err
