#!/usr/bin/env python3
"""Exosphere's side of the user-data template, for tests: fill the placeholders exactly as
Exosphere's `renderUserDataTemplate` (src/Helpers/Helpers.elm) does — plain string replacement,
`{ssh-authorized-keys}` together with its newline, the choices JSON hand-escaped for a
double-quoted shell word, the credential `write_files` block with entries at column 0 — then
strip carriage returns; and hand the result to the real cloud-init's own user-data processor
and cloud-config part handler, which split the MIME parts and merge them as on a booting
instance.

    userdata.py render TEMPLATE [--ssh-key KEY] [--no-os-updates] [--guac] [--gui]
                       [--credentials CLOUDS_YAML] [--workflow REPO [--workflow-ref REF]]
    userdata.py merged USERDATA     # the merged cloud-config cloud-init would act on, as JSON
    userdata.py parts USERDATA DIR  # every cloud-config part to DIR/N.yaml (for `cloud-init schema`)

`merged` and `parts` import cloud-init's own modules: run them with the Python that cloud-init
uses (/usr/bin/python3), with PYTHONPATH pointing at another cloud-init's modules to try that
one.
"""

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path


def extra_vars(guac, gui, workflow=None, workflow_ref=""):
    """Exosphere's `ansibleExtraVars`: JSON with every `"` written as `\\"`; the workflow's
    repository pasted in as typed, its ref only when not empty (the path never: it goes to
    the server's `exoCustomWorkflow` metadata only)."""
    text = '{"guac_enabled":%s,"gui_enabled":%s' % (str(guac).lower(), str(gui).lower())
    if workflow:
        text += ',"workflow_source_repository":"%s"' % workflow
        if workflow_ref:
            text += ',"workflow_repo_version":"%s"' % workflow_ref
    return (text + "}").replace('"', '\\"')


def server_metadata(creator, guac=False, gui=False, workflow=None, version="5"):
    """Exosphere's `newServerMetadata` (src/Helpers/Helpers.elm) for a server it launches,
    without the floating-IP choice: `workflow` is (repository, ref, path) or None; `version`
    5 is the Exosphere that names volumes by `exoVolumes::` server metadata (6 tags devices
    instead). Values are strings; the JSON ones are encoded compactly as Elm's
    `Json.Encode.encode 0` does."""
    meta = {}
    if guac:
        meta["exoGuac"] = json.dumps({"v": 1, "ssh": True, "vnc": gui}, separators=(",", ":"))
    meta.update({"exoServerVersion": version, "exoClientUuid": str(uuid.uuid4()),
                 "exoCreatorUsername": creator, "exoSetup": "waiting"})
    if workflow:
        repo, ref, path = workflow
        meta["exoCustomWorkflow"] = json.dumps({"v": 1, "repo": repo, "ref": ref, "path": path},
                                               separators=(",", ":"))
    return meta


def workflow_token(console_log):
    """Exosphere's `parseConsoleLogForWorkflowToken`: every line from its first `{` (the whole
    line when it has none) decoded as JSON with a string field `exoWorkflowToken`; the last
    one that decodes wins; None when none does."""
    found = None
    for line in console_log.split("\n"):
        start = line.find("{")
        candidate = line[start:] if start >= 0 else line
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("exoWorkflowToken"), str):
            found = value["exoWorkflowToken"]
    return found


def workflow_link(proxy_base, path, token):
    """Exosphere's custom-workflow link: `buildProxyUrl proxy ip 8888 (path ++ "/?token=" ++
    token)`; `proxy_base` stands for `https://http-<ip>-8888.<uap host>`."""
    return proxy_base + path + "/?token=" + token


def credential_write_files(clouds_yaml, keystone_url, region, credential_id, secret):
    """Exosphere's credential block (src/Helpers/Credentials.elm): "\\nwrite_files:" followed by
    one entry per file, list items at column 0, owner exouser, 0400, deferred."""
    openrc = (
        "export OS_AUTH_TYPE=v3applicationcredential\n"
        f"export OS_AUTH_URL={keystone_url}\n"
        "export OS_IDENTITY_API_VERSION=3\n"
        f'export OS_REGION_NAME="{region}"\n'
        "export OS_INTERFACE=public\n"
        f'export OS_APPLICATION_CREDENTIAL_ID="{credential_id}"\n'
        f'export OS_APPLICATION_CREDENTIAL_SECRET="{secret}"\n'
    )

    def entry(path, content):
        body = "".join("    " + line + "\n" for line in content.splitlines())
        return (f"\n- path: {path}\n  content: |\n{body}  owner: exouser:exouser\n"
                "  permissions: '0400'\n  defer: true")

    return ("\nwrite_files:" + entry("/home/exouser/openrc.sh", openrc)
            + entry("/home/exouser/.config/openstack/clouds.yaml", clouds_yaml))


def render(template, ssh_key=None, os_updates=True, guac=False, gui=False,
           credentials="", workflow=None, workflow_ref=""):
    keys = f"\n    ssh-authorized-keys:\n      - {ssh_key}\n" if ssh_key else "\n"
    for placeholder, value in [
        ("{ssh-authorized-keys}\n", keys),
        ("{ansible-extra-vars}", extra_vars(guac, gui, workflow, workflow_ref)),
        ("{install-os-updates}", "true" if os_updates else "false"),
        ("{instance-config-mgt-repo-url}", "https://gitlab.com/exosphere/exosphere.git"),
        ("{instance-config-mgt-repo-checkout}", "master"),
        ("{openstack-credential-write-files}", credentials),
    ]:
        template = template.replace(placeholder, value)
    return template.replace("\r", "")


def cloud_config_parts(userdata):
    """(filename, payload) of each cloud-config part, as cloud-init's processor splits them."""
    from cloudinit import helpers, user_data
    with tempfile.TemporaryDirectory() as tmp:
        paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
        message = user_data.UserDataProcessor(paths).process(userdata)
    parts = []
    for part in message.walk():
        if part.get_content_maintype() == "multipart":
            continue
        if part.get_content_type() == "text/cloud-config":
            parts.append((part.get_filename(), part.get_payload(decode=True).decode()))
    return parts


def merged(userdata):
    """The cloud-config cloud-init acts on: every part through its CloudConfigPartHandler."""
    from cloudinit import handlers, helpers
    from cloudinit.handlers.cloud_config import CloudConfigPartHandler
    with tempfile.TemporaryDirectory() as tmp:
        handler = CloudConfigPartHandler(helpers.Paths({"cloud_dir": tmp, "run_dir": tmp}))
        handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
        for filename, payload in cloud_config_parts(userdata):
            handler.handle_part(None, "text/cloud-config", filename, payload, None, {})
        return handler.cloud_buf


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render")
    r.add_argument("template")
    r.add_argument("--ssh-key")
    r.add_argument("--no-os-updates", action="store_true")
    r.add_argument("--guac", action="store_true")
    r.add_argument("--gui", action="store_true")
    r.add_argument("--credentials", help="a clouds.yaml to inject as Exosphere does")
    r.add_argument("--workflow")
    r.add_argument("--workflow-ref", default="")
    m = sub.add_parser("merged")
    m.add_argument("userdata")
    p = sub.add_parser("parts")
    p.add_argument("userdata")
    p.add_argument("dir")
    args = parser.parse_args()
    if args.command == "render":
        credentials = ""
        if args.credentials:
            credentials = credential_write_files(
                Path(args.credentials).read_text(), "https://keystone.example.org:5000/v3",
                "RegionOne", "0123abcd", "example-secret")
        sys.stdout.write(render(Path(args.template).read_text(), args.ssh_key,
                                not args.no_os_updates, args.guac, args.gui, credentials,
                                args.workflow, args.workflow_ref))
    elif args.command == "merged":
        print(json.dumps(merged(Path(args.userdata).read_text()), indent=1, default=str))
    else:
        out = Path(args.dir)
        for index, (_, payload) in enumerate(cloud_config_parts(Path(args.userdata).read_text())):
            (out / f"{index}.yaml").write_text(payload)


if __name__ == "__main__":
    main()
