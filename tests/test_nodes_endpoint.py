"""The download-endpoint (SSRF) policy the Downloader node applies to endpoints typed into a workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_core.download import DEFAULT_ENDPOINT, Endpoint, resolve_endpoint
from qwen_core.download.endpoint import ensure_public_host
from qwen_core.errors import InvalidInputError


def check_endpoint(value: str, **kwargs: object) -> Endpoint:
    """The decision for an endpoint typed into a workflow (the Downloader node's field)."""
    return resolve_endpoint(value, source="workflow", **kwargs)


def public(host: str, port: int) -> list[str]:
    return ["8.8.8.8"] if host == "mirror.example" else ["1.1.1.1"]


def fake_dns(mapping: dict[str, list[str]]):  # noqa: ANN201
    def resolve(host: str, port: int) -> list[str]:
        if host not in mapping:
            raise OSError("Name or service not known")
        return mapping[host]

    return resolve


class TestEmptyMeansConfigured:
    def test_default_is_the_hub(self) -> None:
        decision = check_endpoint("", env={})
        assert (decision.url, decision.source) == (DEFAULT_ENDPOINT, "default")

    def test_env_endpoint_is_used_and_reported(self) -> None:
        decision = check_endpoint("  ", env={"HF_ENDPOINT": "http://127.0.0.1:9000/"})
        assert (decision.url, decision.source) == ("http://127.0.0.1:9000", "env")
        assert "HF_ENDPOINT" in decision.message


class TestRefused:
    @pytest.mark.parametrize("url", ["ftp://mirror.example", "file:///etc/passwd", "javascript:alert(1)", "mirror.example",
                                     "http://", "http://user:pw@mirror.example", "http://mirror.example:99999",
                                     "http://mirror.example/\nX: y"])
    def test_malformed_or_non_http(self, url: str) -> None:
        with pytest.raises(InvalidInputError) as info:
            check_endpoint(url, env={}, resolver=public)
        assert info.value.field == "endpoint"

    @pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "http://127.0.0.1:8188", "http://localhost",
                                     "http://10.1.2.3", "http://192.168.1.1", "http://172.16.0.5", "http://[::1]:80",
                                     "http://0.0.0.0", "http://2130706433", "http://[::ffff:127.0.0.1]",
                                     "http://[fd00::1]", "http://100.64.0.1"])
    def test_private_loopback_link_local_hosts(self, url: str) -> None:
        """Literal addresses and their odd spellings (decimal, v4-mapped v6) resolve without DNS."""
        with pytest.raises(InvalidInputError, match="non-public"):
            check_endpoint(url, env={})

    def test_a_name_that_resolves_to_a_private_address(self) -> None:
        dns = fake_dns({"evil.example": ["8.8.4.4", "10.0.0.5"]})
        with pytest.raises(InvalidInputError, match="10.0.0.5"):
            check_endpoint("https://evil.example", env={}, resolver=dns)

    def test_an_unresolvable_name(self) -> None:
        with pytest.raises(InvalidInputError, match="cannot be resolved"):
            check_endpoint("https://nowhere.example", env={}, resolver=fake_dns({}))

    def test_same_host_other_port_than_configured_is_still_refused(self) -> None:
        with pytest.raises(InvalidInputError):
            check_endpoint("http://127.0.0.1:22", env={"HF_ENDPOINT": "http://127.0.0.1:9000"})


class TestAllowed:
    def test_public_mirror_is_allowed_and_shown(self) -> None:
        decision = check_endpoint("https://mirror.example/", env={}, resolver=public)
        assert (decision.url, decision.source) == ("https://mirror.example", "workflow")
        assert "https://mirror.example" in decision.message


class TestToken:
    """The user's token must not go to a host that only a (stranger's) workflow names."""

    def test_a_host_only_the_workflow_names_gets_no_token(self) -> None:
        decision = check_endpoint("https://mirror.example", env={}, resolver=public)
        assert decision.send_token is False and "no token sent" in decision.message

    @pytest.mark.parametrize(("url", "env"), [("", {}), ("", {"HF_ENDPOINT": "http://localhost:9000"}),
                                              ("https://huggingface.co/", {}),
                                              ("http://localhost:9000", {"HF_ENDPOINT": "http://localhost:9000"})])
    def test_the_hub_and_the_configured_host_get_the_token(self, url: str, env: dict[str, str]) -> None:
        assert check_endpoint(url, env=env, resolver=public).send_token is True

    def test_the_downloader_node_downloads_anonymously_from_a_workflow_host(
            self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import nodes.downloader as node

        seen: dict[str, object] = {}

        def fake_download(repo_id: str, options: object, hooks: object) -> object:
            seen["endpoint"] = options.endpoint
            raise RuntimeError("stop here")

        monkeypatch.setenv("QWEN_HOME", str(tmp_path))
        monkeypatch.delenv("HF_ENDPOINT", raising=False)
        monkeypatch.setattr(node, "resolve_endpoint",
                            lambda e, source: resolve_endpoint(e, source=source, env={}, resolver=public))
        monkeypatch.setattr(node, "download_repo", fake_download)
        with pytest.raises(RuntimeError, match="stop here"):
            node.QwenImageDownloader().download("org/m", "main", "", "", 1, "https://mirror.example")
        endpoint = seen["endpoint"]
        assert endpoint.url == "https://mirror.example" and endpoint.send_token is False
        assert endpoint.redirect_guard.func is ensure_public_host  # its redirects face the same check
        with pytest.raises(RuntimeError, match="stop here"):
            node.QwenImageDownloader().download("org/m", "main", "", "", 1, "")
        endpoint = seen["endpoint"]
        assert endpoint.url == DEFAULT_ENDPOINT and endpoint.send_token  # HF_TOKEN / `hf auth login` as usual
        assert endpoint.redirect_guard is None  # the user's own HF_ENDPOINT / the hub may redirect freely

    def test_redirect_guard_refuses_a_hop_to_the_metadata_address(self) -> None:
        decision = check_endpoint("https://mirror.example", env={}, resolver=public)
        guard = decision.redirect_guard
        assert guard is not None
        with pytest.raises(InvalidInputError, match="non-public"):
            guard("http://169.254.169.254/latest/meta-data/")  # a literal address: no DNS needed
        with pytest.raises(InvalidInputError, match="non-public"):
            guard("http://127.0.0.1:8188/api")
        assert check_endpoint("", env={}).redirect_guard is None

    def test_private_host_allowed_when_the_user_configured_it(self) -> None:
        decision = check_endpoint("http://LOCALHOST:9000/", env={"HF_ENDPOINT": "http://localhost:9000"},
                                  resolver=fake_dns({}))  # never resolved: configured by the user
        assert decision.source == "workflow" and "same host as HF_ENDPOINT" in decision.message
