fn main() {
    let obj = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));
    let mut bpf = aya::Ebpf::load(obj).unwrap();
    println!("{}", bpf.programs().count());
}
