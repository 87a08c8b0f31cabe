"""configs/serve.yaml and the application builder (no cluster), and the API's request checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image
from ray.serve.schema import ServeDeploySchema

from basnet.errors import UserError
from basnet.serve.http import MaskRequest, RequestError, decode_upload, mask_options, read_upload
from basnet.serve.ray_app import DEPLOYMENT, build_app

from infer_collection import encode, picture

REPO = Path(__file__).resolve().parents[2]


def test_the_serve_config_file_is_valid_and_its_builder_builds_the_app(weights):
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (app,) = schema.applications
    assert app.import_path == "basnet.serve.ray_app:build_app"
    (override,) = app.deployments
    assert override.name == DEPLOYMENT and override.num_replicas == "auto"
    assert override.ray_actor_options.num_gpus == 1
    built = build_app({**app.args, "weights": weights})
    deployment = built._bound_deployment
    assert deployment.name == DEPLOYMENT
    assert deployment._deployment_config.max_ongoing_requests == 32  # 2 x max_batch_size 16
    # `serve run basnet.serve.ray_app:build_app weights=... max_batch_size=4` passes strings
    built = build_app({"weights": weights, "max_batch_size": "4", "num_replicas": "auto", "compile": "false"})
    assert built._bound_deployment._deployment_config.autoscaling_config.min_replicas == 1
    with pytest.raises(UserError, match="checkpoint not found"):
        build_app({"weights": "/nowhere/basnet.pth"})
    with pytest.raises(UserError, match="unknown option 'batch'"):
        build_app({"weights": weights, "batch": 4})
    with pytest.raises(UserError, match="max_batch_size='many' is not a int"):
        build_app({"weights": weights, "max_batch_size": "many"})
    with pytest.raises(UserError, match="port is not an application arg: set http_options"):
        build_app({"weights": weights, "port": 9000})


def test_mask_options_take_the_defaults_and_refuse_bad_values():
    # Refinement as in the bulk job: guided for cut-outs and plain for masks unless asked or set.
    assert mask_options({}, default_format="rgba", default_threshold=0.3) == MaskRequest("rgba", 0.3, "guided")
    assert mask_options({"format": "binary", "threshold": "0"}) == MaskRequest("binary", 0.0, "none")
    assert mask_options({"refine": "guided"}) == MaskRequest("mask", 0.5, "guided")
    assert mask_options({"format": "rgba"}, default_refine="none") == MaskRequest("rgba", 0.5, "none")
    assert mask_options({"normalize": "none", "on_no_object": "empty"}) == MaskRequest(
        "mask", 0.5, "none", "none", "empty")
    assert mask_options({}, default_normalize="none", default_on_no_object="empty") == MaskRequest(
        "mask", 0.5, "none", "none", "empty")
    for query, words in (({"normalize": "max"}, "normalize 'max' is not one of minmax, none"),
                         ({"on_no_object": "drop"}, "on_no_object 'drop' is not one of keep, empty"),({"format": "MASK"}, "format 'MASK'"), ({"threshold": "nan"}, "threshold 'nan'"),
                         ({"threshold": "-0.1"}, "threshold '-0.1'"), ({"q": "1"}, "unknown parameter 'q'"),
                         ({"refine": "Guided"}, "refine 'Guided' is not one of none, guided")):
        with pytest.raises(RequestError, match=words) as err:
            mask_options(query)
        assert err.value.status == 400


def test_uploads_are_refused_with_the_status_that_names_the_problem():
    jpeg = encode(Image.fromarray(picture(20, 30, 1)), "JPEG")
    assert read_upload(jpeg, "image/jpeg") == (jpeg, "")
    assert read_upload(jpeg, "") == (jpeg, "")  # untyped bytes are tried
    assert read_upload(jpeg, "application/x-www-form-urlencoded") == (jpeg, "")  # curl --data-binary's default
    cases = [
        (jpeg, "application/json", 415, "application/json is not an image"),
        (b"", "image/png", 400, "empty body"),
        (b"--x\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nab\r\n--x--\r\n", "multipart/form-data; boundary=x",
         400, "no 'file' field"),
        (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain"
         b"\r\n\r\nab\r\n--x--\r\n", "multipart/form-data; boundary=x", 415, "'a.txt' is text/plain"),
        (b"garbage", "multipart/form-data", 400, "malformed multipart form"),
        # nested a thousand forms deep: the parser's recursion is the client's problem, not a 500
        (b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode()
                  for i in range(1000)), "multipart/form-data; boundary=b0", 400, "malformed multipart form"),
    ]
    for body, kind, status, words in cases:
        with pytest.raises(RequestError, match=words) as err:
            read_upload(body, kind)
        assert err.value.status == status
    decoded = decode_upload(jpeg, size=32, max_pixels=600)
    assert (decoded.image.shape, decoded.height, decoded.width) == ((32, 32, 3), 20, 30)
    with pytest.raises(RequestError, match="above --max-pixels 599") as err:
        decode_upload(jpeg, size=32, max_pixels=599)
    assert err.value.status == 413
