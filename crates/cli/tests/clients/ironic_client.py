#!/usr/bin/env python3
"""Ironic 39's image code against imgcache serve (or the fake Glance / origin directly).

    ironic_client.py WORKDIR COMMAND [ARGS...]

WORKDIR holds the generated ironic.conf (and Ironic's temp files). Ironic reads its Glance
settings from ironic.conf as a deployment does: `[glance] auth_type = admin_token` (an
endpoint and a token, no Keystone) and `endpoint_override`, so GlanceImageService discovers
the image API from the endpoint's version document. Prints one JSON document; a failing call
exits non-zero with Ironic's traceback on stderr.

Commands:
  glance-show ENDPOINT TOKEN ID             GlanceImageService.show
  glance-download ENDPOINT TOKEN ID OUT SHA512
                                            GlanceImageService.download, checking SHA512
                                            while transferring (as the conductor passes
                                            instance_info's image_os_hash_value)
  http-show URL                             HttpImageService.show (HEAD)
  http-download URL OUT                     HttpImageService.download
  checksum SUMS_URL IMAGE_URL               checksum_utils.get_checksum_from_url
  fetch-image MASTER_DIR URL DEST           ImageCache(MASTER_DIR).fetch_image(URL, DEST);
                                            prints the master file's path, inode and mtime
  age-master MASTER_DIR URL SECONDS         sets the master file's mtime SECONDS earlier
"""
import hashlib
import json
import os
import sys
import uuid

WORK = sys.argv[1]
CMD = sys.argv[2]
ARGS = sys.argv[3:]


def configure(endpoint=None, token=None):
    conf = os.path.join(WORK, "ironic.conf")
    os.makedirs(WORK, exist_ok=True)
    with open(conf, "w") as f:
        f.write("[DEFAULT]\ntempdir = %s\n" % WORK)
        if endpoint:
            f.write("[glance]\nauth_type = admin_token\nendpoint = %s\ntoken = %s\n"
                    "endpoint_override = %s\nnum_retries = 0\n" % (endpoint, token, endpoint))
    from ironic.conf import CONF
    CONF([], project="ironic", default_config_files=[conf])
    return CONF


def main():
    out = {}
    if CMD.startswith("glance-"):
        endpoint, token, image_id = ARGS[:3]
        configure(endpoint, token)
        # ironic.common.image_service first: importing glance_service's module alone is a
        # circular import.
        import ironic.common.image_service  # noqa: F401
        from ironic.common import context
        from ironic.common.glance_service import image_service as gis
        svc = gis.GlanceImageService(context=context.get_admin_context())
        if CMD == "glance-show":
            meta = svc.show(image_id)
            out = {k: meta.get(k) for k in ("id", "name", "status", "size", "checksum",
                                             "os_hash_algo", "os_hash_value", "disk_format",
                                             "visibility")}
            out["updated_at"] = str(meta.get("updated_at"))
        else:
            svc.show(image_id)
            with open(ARGS[3], "wb") as f:
                svc.download(image_id, f, checksum=ARGS[4], checksum_algo="sha512")
            out = {"verified": svc._transfer_verified_checksum,
                   "size": os.path.getsize(ARGS[3])}
    else:
        configure()
        from ironic.common import image_service
        if CMD == "http-show":
            meta = image_service.HttpImageService().show(ARGS[0])
            out = {"size": meta["size"], "updated_at": str(meta["updated_at"]),
                   "no_cache": meta["no_cache"]}
        elif CMD == "http-download":
            with open(ARGS[1], "wb") as f:
                image_service.HttpImageService().download(ARGS[0], f)
            h = hashlib.sha256(open(ARGS[1], "rb").read()).hexdigest()
            out = {"size": os.path.getsize(ARGS[1]), "sha256": h}
        elif CMD == "checksum":
            from ironic.common import checksum_utils
            out = {"checksum": checksum_utils.get_checksum_from_url(ARGS[0], ARGS[1])}
        elif CMD in ("fetch-image", "age-master"):
            master_dir, url = ARGS[0], ARGS[1]
            master = os.path.join(master_dir, str(uuid.uuid5(uuid.NAMESPACE_URL, url)))
            master += ".converted"
            if CMD == "fetch-image":
                from ironic.drivers.modules import image_cache
                cache = image_cache.ImageCache(master_dir, cache_size=1 << 30,
                                               cache_ttl=3600)
                cache.fetch_image(url, ARGS[2], force_raw=True)
            else:
                st = os.stat(master)
                t = st.st_mtime - float(ARGS[2])
                os.utime(master, (t, t))
            st = os.stat(master)
            out = {"master": master, "inode": st.st_ino, "mtime": st.st_mtime,
                   "dest_inode": os.stat(ARGS[2]).st_ino if CMD == "fetch-image" else None}
        else:
            sys.exit("unknown command %s" % CMD)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
