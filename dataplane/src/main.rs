//! `dataplane`: the stockplane data plane server and its tools.

fn main() {
    eprintln!("dataplane: the server lands with issue 3; nothing runs yet");
    std::process::exit(2);
}
