//! Runs the fake Glance and the file origin by hand: `cargo run -p imgcache-testkit --example
//! fake_glance -- [ORIGIN_DIR]`. Prints their URLs and the tokens, seeds one image, and runs
//! until stdin closes.

use imgcache_testkit::glance::{self, ADMIN_TOKEN, FakeGlance, MEMBER_TOKEN};

fn main() {
    let fake = match FakeGlance::start() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake Glance unavailable: {e}");
            std::process::exit(1);
        }
    };
    let id = glance::seed_bytes(&fake, "demo", &imgcache_testkit::image_bytes(1 << 20, 1));
    println!(
        "glance {} admin {ADMIN_TOKEN} member {MEMBER_TOKEN} image {id}",
        fake.url
    );
    let _origin = std::env::args().nth(1).map(|dir| {
        let o = imgcache_testkit::origin::Origin::start(dir);
        println!("origin {}", o.url);
        o
    });
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}
