import pytest

from readmission_platform.settings import ServingSettings, Settings


def test_serving_settings_default_to_the_documented_values():
    serving = ServingSettings.from_env({})
    assert (serving.api_token, serving.reload_seconds, serving.workers, serving.threads) == (None, 30.0, 1, 1)
    assert (serving.log_queue_rows, serving.log_writer_nice, serving.fast_path, serving.max_body_bytes) == (
        100_000, -5, True, None,
    )  # fmt: skip


def test_serving_settings_read_every_variable():
    serving = ServingSettings.from_env(
        {"READMISSION_API_TOKEN": "s3cret", "READMISSION_RELOAD_SECONDS": "0.5", "READMISSION_SERVE_WORKERS": "4",
         "READMISSION_SERVE_THREADS": "2", "READMISSION_PREDICTION_LOG_QUEUE_ROWS": "7",
         "READMISSION_PREDICTION_LOG_NICE": "0", "READMISSION_FAST_PATH": "0", "READMISSION_MAX_BODY_BYTES": "1024"}
    )  # fmt: skip
    assert serving == ServingSettings("s3cret", 0.5, 4, 2, 7, 0, False, 1024)


@pytest.mark.parametrize(
    ("variable", "text", "expected"),
    [("READMISSION_SERVE_WORKERS", "two", "a whole number"), ("READMISSION_RELOAD_SECONDS", "soon", "a number")],
)
def test_a_malformed_number_names_its_variable(variable, text, expected):
    with pytest.raises(ValueError, match=f"{variable} is '{text}'; expected {expected}"):
        ServingSettings.from_env({variable: text})


@pytest.mark.parametrize(
    ("variable", "text"),
    [("READMISSION_RELOAD_SECONDS", "0"), ("READMISSION_RELOAD_SECONDS", "nan"), ("READMISSION_RELOAD_SECONDS", "inf"),
     ("READMISSION_SERVE_WORKERS", "0"), ("READMISSION_SERVE_THREADS", "-1"), ("READMISSION_PREDICTION_LOG_QUEUE_ROWS", "0"),
     ("READMISSION_PREDICTION_LOG_NICE", "40"), ("READMISSION_MAX_BODY_BYTES", "-1"),
     ("READMISSION_CANDIDATE_TIMEOUT_MS", "inf")],
)  # fmt: skip
def test_a_number_no_worker_could_work_with_names_its_variable_and_range(variable, text):
    with pytest.raises(ValueError, match=f"{variable} is '{text}'; expected a (whole )?number from "):
        ServingSettings.from_env({variable: text})


def test_serve_names_a_bad_serving_variable_before_starting_anything(tmp_path, monkeypatch, capsys):
    from readmission_platform.cli.main import main

    monkeypatch.setenv("READMISSION_HOME", str(tmp_path))
    monkeypatch.setenv("READMISSION_SERVE_WORKERS", "abc")
    assert main(["serve", "--source"]) == 2  # it would exec bentoml serve otherwise
    assert capsys.readouterr().err == "readmission serve: READMISSION_SERVE_WORKERS is 'abc'; expected a whole number\n"


def test_settings_name_the_variable_behind_each_value(tmp_path):
    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert settings.variables == {"mlflow_tracking_uri": "MLFLOW_TRACKING_URI"}
    assert settings.warehouse_url == f"duckdb:///{tmp_path / 'warehouse.duckdb'}"


def test_the_landing_folder_may_live_outside_the_home(tmp_path):
    assert Settings.from_env({"READMISSION_HOME": str(tmp_path)}).landing_dir == tmp_path / "landing"
    shared = Settings.from_env({"READMISSION_HOME": str(tmp_path / "home"), "READMISSION_LANDING_DIR": str(tmp_path / "in")})
    assert shared.landing_dir == tmp_path / "in"


def test_a_tracking_server_keeps_the_artifacts_and_a_database_store_the_home(tmp_path):
    # A tracking server proxies artifacts to its own destination: a client names no folder of its own.
    server = Settings.from_env({"READMISSION_HOME": str(tmp_path), "READMISSION_MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert server.mlflow_artifact_location is None
    local = Settings.from_env({"READMISSION_HOME": str(tmp_path), "READMISSION_MLFLOW_TRACKING_URI": "postgresql://db/m"})
    assert local.mlflow_artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
