from tests.client.support import proxies, proxy  # noqa: F401
