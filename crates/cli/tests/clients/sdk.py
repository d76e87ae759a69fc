#!/usr/bin/env python3
"""openstacksdk against a Glance endpoint (imgcache serve, or the fake Glance itself).

    sdk.py ENDPOINT TOKEN COMMAND [ARGS...]

Authenticates with keystoneauth's `admin_token` plugin (an endpoint and a token, no
Keystone) and ENDPOINT as the unversioned image endpoint (`image_endpoint_override`, as
Ironic configures the SDK), so the SDK discovers the image API from ENDPOINT's version
document as it does from a catalog entry. Prints one JSON document on stdout; exits non-zero (traceback on stderr)
when a call fails, so the test sees the SDK's own message.

Commands:
  get-image ID              the image record (get_image)
  images                    ids and names of every image (images(), all pages)
  download ID OUT           download_image(stream=True, output=OUT): the SDK checks the
                            os_hash_value (or md5) while writing; prints size and sha256
  download-stream ID OUT    download_image(stream=True) and iterate the response, checking
                            os_hash_value here as the SDK documents for streams
  cache-list                get_image_cache()
  cache-queue ID            queue_image
  cache-delete ID           cache_delete_image(ignore_missing=False)
  cache-clear [TARGET]      clear_cache(TARGET), TARGET both|cache|queue
  cache-nodes ID            cached_image_nodes(ID): the node URLs holding it (fleet mode)
"""
import hashlib
import json
import sys

import openstack


def conn(endpoint, token):
    return openstack.connection.Connection(
        auth_type="admin_token",
        auth={"endpoint": endpoint, "token": token},
        image_endpoint_override=endpoint,
        image_api_version="2",
    )


def main():
    endpoint, token, cmd, *args = sys.argv[1:]
    c = conn(endpoint, token)
    out = {}
    if cmd == "get-image":
        img = c.image.get_image(args[0])
        out = {
            "id": img.id, "name": img.name, "status": img.status,
            "size": img.size, "checksum": img.checksum,
            "os_hash_algo": img.hash_algo, "os_hash_value": img.hash_value,
            "disk_format": img.disk_format, "visibility": img.visibility,
            "updated_at": img.updated_at,
        }
    elif cmd == "images":
        out = {"images": [{"id": i.id, "name": i.name} for i in c.image.images()]}
    elif cmd == "download":
        c.image.download_image(args[0], stream=True, output=args[1])
        h = hashlib.sha256()
        n = 0
        with open(args[1], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                n += len(chunk)
        out = {"size": n, "sha256": h.hexdigest()}
    elif cmd == "download-stream":
        img = c.image.get_image(args[0])
        resp = c.image.download_image(img, stream=True)
        hasher = hashlib.new(img.hash_algo)
        n = 0
        with open(args[1], "wb") as f:
            for chunk in resp.iter_content(chunk_size=1 << 20):
                hasher.update(chunk)
                f.write(chunk)
                n += len(chunk)
        if hasher.hexdigest() != img.hash_value:
            sys.exit("os_hash_value mismatch: %s != %s" % (hasher.hexdigest(), img.hash_value))
        out = {"size": n, "content_md5": resp.headers.get("Content-MD5"),
               "content_type": resp.headers.get("Content-Type")}
    elif cmd == "cache-list":
        cache = c.image.get_image_cache()
        out = {"cached_images": [ci.image_id for ci in cache.cached_images or []],
               "queued_images": list(cache.queued_images or [])}
    elif cmd == "cache-queue":
        c.image.queue_image(args[0])
    elif cmd == "cache-delete":
        c.image.cache_delete_image(args[0], ignore_missing=False)
    elif cmd == "cache-clear":
        c.image.clear_cache(args[0] if args else "both")
    elif cmd == "cache-nodes":
        out = {"nodes": c.image.cached_image_nodes(args[0])}
    else:
        sys.exit("unknown command %s" % cmd)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
