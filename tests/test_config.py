"""One validated configuration for the workflow and every sub-command; it reaches each job as given."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT
from prrtquant import dosimetry as D
from prrtquant.bounds import BoundsSettings
from prrtquant.cli import main
from prrtquant.config import CONFIG_SCHEMA, ConfigError, load_config, validate_config
from prrtquant.ingest import IngestConfig
from prrtquant.quantify_stage import QuantifySettings
from prrtquant.register_stage import settings_from_config
from prrtquant.registration import RegistrationSettings

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


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


@pytest.mark.slow
def test_command_line_config_override_reaches_the_job_and_reruns_it(tmp_path):
    """``snakemake --config quantify='{threshold: 10.0}'`` changes eligibility.json (the job gets the validated
    config, schema defaults included); the same command without it reruns quantify alone (its params changed)."""
    results = tmp_path / "results"
    sheet = pd.read_csv(ROOT / "test_data" / "patients.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet = sheet[sheet.patient == "P01"].assign(dicom_dir=str(ROOT / "test_data" / "P01" / "DICOM"))
    sheet.to_csv(tmp_path / "patients.tsv", sep="\t", index=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"patients": str(tmp_path / "patients.tsv"),
                                                          "results": str(results)}))
    base = [SNAKEMAKE, "--workflow-profile", str(ROOT / "workflow" / "profiles" / "default"), "--cores", "1",
            "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path), str(results / "P01" / "quantify")]
    r = subprocess.run([*base, "--config", "quantify={threshold: 10.0}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elig = json.loads((results / "P01" / "quantify" / "eligibility.json").read_text())
    assert elig["threshold"] == 10.0 and elig["eligible"] is False
    q = json.loads((results / "P01" / "quantify" / "quantify.json").read_text())
    assert q["settings"]["max_lesions"] == 5  # a schema default, filled in by the workflow's validation
    r = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rule quantify" in r.stdout + r.stderr and "rule ingest" not in r.stdout + r.stderr
    elig = json.loads((results / "P01" / "quantify" / "eligibility.json").read_text())
    assert elig["threshold"] == 3.0 and elig["eligible"] is True
