"""The files endpoints: uploads validated in the same pass that stores them."""

from __future__ import annotations

import hashlib

from tests.api_fixtures import chat_lines


def upload(api, body: bytes, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return api.post("/v1/files", files={"file": (name, body)}, data={"purpose": purpose})


def test_valid_chat_file_is_processed_and_counted(api):
    body = chat_lines(12)
    response = upload(api, body)
    assert response.status_code == 200
    file = response.json()
    assert file["object"] == "file"
    assert file["status"] == "processed"
    assert file["status_details"] is None
    assert file["n_examples"] == 12
    assert file["bytes"] == len(body)
    assert file["sha256"] == hashlib.sha256(body).hexdigest()


def test_content_returns_the_uploaded_bytes(api):
    body = chat_lines(10)
    file_id = upload(api, body).json()["id"]
    assert api.get(f"/v1/files/{file_id}/content").content == body


def test_broken_lines_are_reported_with_their_line_numbers(api):
    lines = chat_lines(12).splitlines(keepends=True)
    lines[2] = b'{"messages": [{"role": "user", "content": "hi"}\n'
    lines[6] = b'{"messages": [{"role": "assitant", "content": "x"}]}\n'
    file = upload(api, b"".join(lines)).json()
    assert file["status"] == "error"
    assert "line 3: invalid JSON" in file["status_details"]
    assert (
        'line 7: messages[0].role: "assitant" is not one of system, user, assistant, tool'
        in file["status_details"]
    )


def test_list_retrieve_and_delete(api):
    first = upload(api, chat_lines(10)).json()["id"]
    second = upload(api, chat_lines(11)).json()["id"]
    listed = api.get("/v1/files").json()
    assert [f["id"] for f in listed["data"]] == [second, first]
    assert api.get(f"/v1/files/{first}").json()["n_examples"] == 10
    deleted = api.delete(f"/v1/files/{first}").json()
    assert deleted == {"id": first, "object": "file", "deleted": True}
    assert api.get(f"/v1/files/{first}").status_code == 404
    assert api.get(f"/v1/files/{first}/content").status_code == 404


def test_unknown_purpose_is_refused_with_an_openai_error(api):
    response = upload(api, chat_lines(10), purpose="assistants")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "purpose"
    assert set(error) == {"message", "type", "param", "code"}


def test_missing_file_answers_404_in_openai_shape(api):
    response = api.get("/v1/files/file-doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_form_without_a_file_is_refused_naming_the_file_field(api):
    response = api.post("/v1/files", files={"purpose": (None, "fine-tune")})  # (None, …): a plain field
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "file: Field required"
    assert response.json()["error"]["param"] == "file"


def test_a_file_sent_as_a_plain_form_field_is_refused_naming_it(api):
    response = api.post("/v1/files", files={"purpose": (None, "fine-tune"), "file": (None, "not a file")})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"


def test_a_body_that_is_not_a_multipart_form_is_refused(api):
    response = api.post("/v1/files", json={"purpose": "fine-tune"})
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "file"


def test_a_file_whose_purpose_comes_after_it_is_stored_once(api):
    # curl -F file=@train.jsonl -F purpose=fine-tune sends the file first.
    boundary = "tunery-boundary"
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'.encode(),
            chat_lines(10),
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode(),
            f"--{boundary}--\r\n".encode(),
        ]
    )
    response = api.post(
        "/v1/files", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["bytes"]) == ("processed", len(chat_lines(10)))
    assert len(api.get("/v1/files").json()["data"]) == 1
