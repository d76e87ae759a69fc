# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_imgcache_global_optspecs
    string join \n json config= cache-dir= driver= h/help V/version
end

function __fish_imgcache_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_imgcache_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_imgcache_using_subcommand
    set -l cmd (__fish_imgcache_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c imgcache -n "__fish_imgcache_needs_command" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_needs_command" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_needs_command" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_needs_command" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_needs_command" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "list" -d 'List cached images (ordered by image id)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "add" -d 'Publish a local file into the cache under KEY (sha256 computed while copying)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "queue" -d 'Queue KEY for prefetching'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "delete" -d 'Delete KEY from the cache and from the queue'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "clear" -d 'Delete every cached image and/or queued entry'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "stats" -d 'Show the cache\'s driver, location, size and counts'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "verify" -d 'Re-hash cached images (all, or the given keys) against their recorded checksums; a mismatch is moved to invalid/ and its record dropped (exit 1 when any mismatched)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "inspect" -d 'Inspect a disk image file: its format (read from its bytes, never its name), virtual size, header facts and every safety verdict; exits 1 when the image would be refused'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "cleanup" -d 'Clean up provisioning caches: leftovers, masters past their TTL, then least recently used ones until each fits its size (all caches unless --cache is given)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "caches" -d 'List the provisioning caches: directory, priority, limits, size and free space'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "prune" -d 'Evict least recently accessed images until the cache fits in max size'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "clean" -d 'Remove stalled incomplete writes, invalid files and records whose file vanished'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "fsck" -d 'Check the cache directory\'s files against its records; --repair fixes what disagrees'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "fleet" -d 'Read the fleet index: live nodes, or who holds an image (fleet mode)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "fetch" -d 'Fetch an image (http(s) URL, file:// path or Glance id) into DEST through the cache: downloaded once, verified, then hard-linked (copied across filesystems)'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "serve" -d 'Run the caching image server: Glance\'s image download and cache-management API, one origin download per image with every client streamed while it runs'
complete -c imgcache -n "__fish_imgcache_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -l queued -d 'List the queued image ids instead, oldest first'
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand list" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -l checksum -d 'Expected checksum, ALGO:HEX with ALGO md5, sha256 or sha512; a mismatch publishes nothing' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -s q -l quiet -d 'No progress bar (it is only shown when stderr is a terminal anyway)'
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand add" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand queue" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand delete" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -l target -d 'What to clear' -r -f -a "cache\t''
queue\t''
all\t''"
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand clear" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand stats" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -s q -l quiet -d 'No progress bar (it is only shown when stderr is a terminal anyway)'
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand verify" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -l format -d 'The format the image is declared as (raw, qcow2, vmdk, vhd, vhdx, vdi, iso, luks, ami, aki, ari); the content must match it' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand inspect" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l cache -d 'Only this named cache ([caches.NAME] in the config; "default" is --cache-dir)' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l amount -d 'Stop once this many bytes are reclaimed (e.g. 5G)' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand cleanup" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand caches" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -l max-size -d 'Size to prune to, e.g. 10G, 512M, 0 [env: IMGCACHE_MAX_SIZE] [config: max_size] [default: 10G (Glance\'s default)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand prune" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -l stall-time -d 'Age after which an unfinished write counts as stalled, e.g. 24h, 30m [env: IMGCACHE_STALL_TIME] [config: stall_time] [default: 24h (Glance\'s default)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand clean" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l stall-time -d 'Age after which an unfinished write counts as stalled, e.g. 24h, 30m [env: IMGCACHE_STALL_TIME] [config: stall_time] [default: 24h (Glance\'s default)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l repair -d 'Repair what is found (without it, nothing is changed)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -s q -l quiet -d 'No progress bar while hashing (it is only shown when stderr is a terminal anyway)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand fsck" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -l fleet-db -d 'Fleet mode: the shared PostgreSQL index, e.g. postgresql://user@host:5432/imgcache; a miss fills from a live holder, else under the fleet\'s one origin lease [env: IMGCACHE_FLEET_DB] [config: fleet_db] [default: none: a single node]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -f -a "nodes" -d 'Live nodes: URL, heartbeat age, what each holds and is filling'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -f -a "holders" -d 'The live nodes holding or filling an image (Glance\'s cache-nodes-list, with states)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and not __fish_seen_subcommand_from nodes holders help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from nodes" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from holders" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from help" -f -a "nodes" -d 'Live nodes: URL, heartbeat age, what each holds and is filling'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from help" -f -a "holders" -d 'The live nodes holding or filling an image (Glance\'s cache-nodes-list, with states)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fleet; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l format -d 'The format the image is declared as (raw, qcow2, vmdk, vhd, vhdx, vdi, iso, ami, aki, ari): the content must match it [default: Glance\'s disk_format for image ids]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l permitted-formats -d 'Image formats accepted at all, comma-separated [default: fetch raw,gpt,qcow2,iso; serve: every format the inspector knows (unsafe images are refused either way)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l qemu-img -d 'The qemu-img used for --raw conversions' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l checksum -d 'Expected checksum ALGO:HEX (md5, sha256, sha512) or the URL of a SHA256SUMS-style file' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l cache -d 'Named cache to fetch through ([caches.NAME]); default: --cache-dir' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l glance-url -d 'Glance endpoint for image ids [env: IMGCACHE_GLANCE_URL] [config: glance_url]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l allow-file-dir -d 'Directory file:// hrefs may read from (repeatable; none by default) [env: IMGCACHE_ALLOW_FILE_DIRS (:-separated)] [config: allow_file_dirs] [default: none: file:// is refused]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l revalidate-interval -d 'Use an http(s) master without asking the origin within this time of its last check (0s: one conditional request on every call, as Ironic does) [env: IMGCACHE_REVALIDATE_INTERVAL] [config: revalidate_interval] [default: fetch: 0s (ask on every call); serve: 60s]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l ca-bundle -d 'Extra CA certificates (PEM) to trust [env: IMGCACHE_CA_BUNDLE] [config: ca_bundle] [default: system roots only]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l fleet-db -d 'Fleet mode: the shared PostgreSQL index, e.g. postgresql://user@host:5432/imgcache; a miss fills from a live holder, else under the fleet\'s one origin lease [env: IMGCACHE_FLEET_DB] [config: fleet_db] [default: none: a single node]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l node-url -d 'Fleet mode: how peers and clients reach this node (for fetch: the URL of a `serve` on the same cache, which serves its images to peers) [env: IMGCACHE_NODE_URL] [config: node_url] [default: none: http:// and the listen address (fetch: the serve on its cache directory, by its marker)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l fleet-token -d 'Fleet mode: the token peers present to each other [env: IMGCACHE_FLEET_TOKEN] [config: fleet_token] [default: none: required with a fleet database]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l raw -d 'Fetch as raw (keyed KEY.converted, as Ironic\'s force_raw): images in another format are converted with qemu-img (raw and ISO images are used as they are)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l no-zstd -d 'Cache zstd-compressed downloads as they are instead of decompressing them'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -s q -l quiet -d 'No progress bar (it is only shown when stderr is a terminal anyway)'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l insecure -d 'Accept any TLS certificate (labs only) [env: IMGCACHE_INSECURE] [config: insecure] [default: false]'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand fetch" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l permitted-formats -d 'Image formats accepted at all, comma-separated [default: fetch raw,gpt,qcow2,iso; serve: every format the inspector knows (unsafe images are refused either way)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l tls-cert -d 'TLS certificate chain (PEM); serves HTTPS with --tls-key' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l tls-key -d 'TLS private key (PEM)' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l log-format -d 'Log format on stderr' -r -f -a "text\t''
json\t''"
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l max-size -d 'Hard limit on the cache\'s size, e.g. 10G [env: IMGCACHE_MAX_SIZE] [config: max_size] [default: 10G (Glance\'s default)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l glance-url -d 'Upstream Glance endpoint [env: IMGCACHE_GLANCE_URL] [config: glance_url]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l allow-file-dir -d 'Directory file:// hrefs may read from (repeatable; none by default) [env: IMGCACHE_ALLOW_FILE_DIRS (:-separated)] [config: allow_file_dirs] [default: none: file:// is refused]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l listen -d 'Address to listen on, HOST:PORT: an IP ([::1]:9292 for IPv6) or a host name, resolved [env: IMGCACHE_LISTEN] [config: listen] [default: 127.0.0.1:9292]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l admin-token -d 'X-Auth-Token that grants the cache-management API [env: IMGCACHE_ADMIN_TOKEN] [config: admin_token]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l allow-href-prefix -d '/v1/fetch serves only hrefs under the URL PREFIX (scheme, host, port exact; path on a segment boundary; every redirect re-checked) (repeatable) [env: IMGCACHE_ALLOW_HREF_PREFIXES (whitespace-separated)] [config: allow_href_prefixes] [default: none: /v1/fetch refuses every href]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l fleet-db -d 'Fleet mode: the shared PostgreSQL index, e.g. postgresql://user@host:5432/imgcache; a miss fills from a live holder, else under the fleet\'s one origin lease [env: IMGCACHE_FLEET_DB] [config: fleet_db] [default: none: a single node]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l node-url -d 'Fleet mode: how peers and clients reach this node (for fetch: the URL of a `serve` on the same cache, which serves its images to peers) [env: IMGCACHE_NODE_URL] [config: node_url] [default: none: http:// and the listen address (fetch: the serve on its cache directory, by its marker)]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l fleet-token -d 'Fleet mode: the token peers present to each other [env: IMGCACHE_FLEET_TOKEN] [config: fleet_token] [default: none: required with a fleet database]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l scrub-interval -d 'Re-hash every cached image against its recorded checksum this often, in the background at low priority (a mismatch goes to invalid/), e.g. 24h [env: IMGCACHE_SCRUB_INTERVAL] [config: scrub_interval] [default: none: no background verify]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l shutdown-grace -d 'After SIGTERM/SIGINT, how long in-flight responses may run before they are cut [env: IMGCACHE_SHUTDOWN_GRACE] [config: shutdown_grace] [default: 30s]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l header-read-timeout -d 'A client must send its request headers within this (slowloris protection) [env: IMGCACHE_HEADER_READ_TIMEOUT] [config: header_read_timeout] [default: 10s]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l auth-cache-ttl -d 'How long an upstream "this token may read this image" answer is reused [env: IMGCACHE_AUTH_CACHE_TTL] [config: auth_cache_ttl] [default: 60s]' -r
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l config -d 'TOML configuration file (keys: cache_dir, driver, max_size, stall_time, ttl, glance_url, glance_token, allow_file_dirs, revalidate_interval, ca_bundle, origin_attempt_timeout, origin_retries, origin_retry_budget, insecure, listen, admin_token, allow_href_prefixes, fleet_db, node_url, fleet_token, heartbeat_timeout, peer_fanout, scrub_interval, access_log, prune_interval, clean_interval, shutdown_grace, header_read_timeout, auth_cache_ttl, [caches.NAME]) [env: IMGCACHE_CONFIG]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l cache-dir -d 'Cache directory [env: IMGCACHE_CACHE_DIR] [config: cache_dir] [default: /var/cache/imgcache as root, else $XDG_CACHE_HOME/imgcache or ~/.cache/imgcache]' -r -F
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l driver -d 'Metadata driver [env: IMGCACHE_DRIVER] [config: driver] [default: sqlite]' -r -f -a "sqlite\t'Records in an embedded SQLite database in the cache directory (needs nothing installed)'
xattr\t'Records in user.imgcache.* extended attributes of the image files'"
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -l json -d 'Print machine-readable JSON instead of text'
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c imgcache -n "__fish_imgcache_using_subcommand serve" -s V -l version -d 'Print version'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "list" -d 'List cached images (ordered by image id)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "add" -d 'Publish a local file into the cache under KEY (sha256 computed while copying)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "queue" -d 'Queue KEY for prefetching'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "delete" -d 'Delete KEY from the cache and from the queue'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "clear" -d 'Delete every cached image and/or queued entry'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "stats" -d 'Show the cache\'s driver, location, size and counts'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "verify" -d 'Re-hash cached images (all, or the given keys) against their recorded checksums; a mismatch is moved to invalid/ and its record dropped (exit 1 when any mismatched)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "inspect" -d 'Inspect a disk image file: its format (read from its bytes, never its name), virtual size, header facts and every safety verdict; exits 1 when the image would be refused'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "cleanup" -d 'Clean up provisioning caches: leftovers, masters past their TTL, then least recently used ones until each fits its size (all caches unless --cache is given)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "caches" -d 'List the provisioning caches: directory, priority, limits, size and free space'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "prune" -d 'Evict least recently accessed images until the cache fits in max size'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "clean" -d 'Remove stalled incomplete writes, invalid files and records whose file vanished'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "fsck" -d 'Check the cache directory\'s files against its records; --repair fixes what disagrees'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "fleet" -d 'Read the fleet index: live nodes, or who holds an image (fleet mode)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "fetch" -d 'Fetch an image (http(s) URL, file:// path or Glance id) into DEST through the cache: downloaded once, verified, then hard-linked (copied across filesystems)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "serve" -d 'Run the caching image server: Glance\'s image download and cache-management API, one origin download per image with every client streamed while it runs'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and not __fish_seen_subcommand_from list add queue delete clear stats verify inspect cleanup caches prune clean fsck fleet fetch serve help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and __fish_seen_subcommand_from fleet" -f -a "nodes" -d 'Live nodes: URL, heartbeat age, what each holds and is filling'
complete -c imgcache -n "__fish_imgcache_using_subcommand help; and __fish_seen_subcommand_from fleet" -f -a "holders" -d 'The live nodes holding or filling an image (Glance\'s cache-nodes-list, with states)'
