"""Keystone contents for tests/e2e: the service project, nova and placement users, the catalog
(compute, placement, and the image/network stand-in). Idempotent.

usage: keystone_setup.py KEYSTONE_URL NOVA_URL PLACEMENT_URL IMAGE_URL NETWORK_URL
"""
import sys

from keystoneauth1 import session
from keystoneauth1.identity import v3
from keystoneclient.v3 import client

ks_url, nova_url, placement_url, image_url, network_url = sys.argv[1:6]
auth = v3.Password(auth_url=ks_url, username="admin", password="admin", project_name="admin",
                   user_domain_name="Default", project_domain_name="Default")
ks = client.Client(session=session.Session(auth=auth))


def one(manager, name, **create):
    found = [x for x in manager.list() if x.name == name]
    return found[0] if found else manager.create(name=name, **create)


service_project = one(ks.projects, "service", domain="default")
roles = [one(ks.roles, "admin"), one(ks.roles, "service")]
for name in ("nova", "placement"):
    user = one(ks.users, name, domain="default", password=name)
    for role in roles:
        ks.roles.grant(role, user=user, project=service_project)
catalog = {"compute": ("nova", nova_url), "placement": ("placement", placement_url),
           "image": ("glance", image_url), "network": ("neutron", network_url)}
for stype, (sname, url) in catalog.items():
    existing = [s for s in ks.services.list() if s.type == stype]
    svc = existing[0] if existing else ks.services.create(name=sname, type=stype)
    have = {e.interface for e in ks.endpoints.list(service=svc)}
    for iface in ("public", "internal", "admin"):
        if iface not in have:
            ks.endpoints.create(service=svc, url=url, interface=iface, region="RegionOne")
print("keystone setup: ok")
