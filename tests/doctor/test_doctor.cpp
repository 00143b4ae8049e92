// ringflow-doctor: crafted dumps (a rank behind, a disagreement, a missing
// rank), real dumps from a thread-backend run where one rank skips a
// collective, and bad files (one error line naming the file, exit 2).
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "analysis.hpp"
#include "ringflow/backends/local.hpp"
#include "ringflow/coll/collectives.hpp"
#include "ringflow/comm/flight.hpp"
#include "support/catch.hpp"

namespace fs = std::filesystem;
namespace doc = ringflow::doctor;

namespace {

fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("ringflow_doctor_test_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary);
  out << text;
}

std::string header(int rank, long long time_ns = 2'000'000'000) {
  return "{\"type\":\"header\",\"format\":\"ringflow-flight\",\"version\":1,\"process_rank\":" +
         std::to_string(rank) +
         ",\"pid\":100,\"host\":\"h\",\"reason\":\"test\",\"time_ns\":" + std::to_string(time_ns) +
         ",\"ring_size\":256,\"communicators\":1}\n";
}

std::string comm_line(int rank, int size, int started) {
  return "{\"type\":\"comm\",\"comm\":\"00000000000000ab\",\"instance\":0,\"rank\":" +
         std::to_string(rank) + ",\"size\":" + std::to_string(size) +
         ",\"backend\":\"mpi\",\"started\":" + std::to_string(started) + ",\"retired\":false}\n";
}

std::string rec(int rank, int size, int seq, const std::string& state,
                const std::string& dtype = "float", int count = 256, int wait_peer = -1) {
  return "{\"type\":\"record\",\"comm\":\"00000000000000ab\",\"instance\":0,\"rank\":" +
         std::to_string(rank) + ",\"size\":" + std::to_string(size) +
         ",\"seq\":" + std::to_string(seq) + ",\"kind\":\"allreduce\",\"dtype\":\"" + dtype +
         "\",\"op\":\"sum\",\"count\":" + std::to_string(count) +
         ",\"root\":-1,\"algorithm\":\"ring\",\"state\":\"" + state +
         "\",\"start_ns\":1000000000,\"end_ns\":" + (state == "running" ? "0" : "1000001000") +
         ",\"wait_peer\":" + std::to_string(wait_peer) +
         ",\"wait_tag\":" + (wait_peer >= 0 ? "16385" : "-1") +
         ",\"wait_since_ns\":" + (wait_peer >= 0 ? "1000000500" : "0") + "}\n";
}

std::vector<doc::dump> load_all(const fs::path& dir) {
  std::vector<doc::dump> dumps;
  const auto paths = doc::expand_paths({dir.string()});
  for (std::size_t i = 0; i < paths.size(); ++i) dumps.push_back(doc::load_dump(paths[i], i));
  return dumps;
}

// Runs ringflow-doctor; returns its exit status, its stderr in `err`.
int run_doctor(const std::string& args, std::string& out) {
  const fs::path log = fs::temp_directory_path() / "ringflow_doctor_test_output.txt";
  const std::string cmd =
      std::string(RINGFLOW_DOCTOR_EXE) + " " + args + " >" + log.string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream in(log);
  out.assign(std::istreambuf_iterator<char>(in), {});
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

TEST_CASE("doctor: the rank that has not started the front collective is behind", "[doctor]") {
  const fs::path dir = scratch("behind");
  // Ranks 0 and 2 are in #5 waiting on rank 1; rank 1 finished #4 only.
  for (int r : {0, 2}) {
    std::string t = header(r) + comm_line(r, 3, 6);
    for (int s = 0; s < 5; ++s) t += rec(r, 3, s, "done");
    t += rec(r, 3, 5, "running", "float", 256, 1);
    write(dir / ("ringflow-flight." + std::to_string(r) + ".jsonl"), t);
  }
  std::string t = header(1) + comm_line(1, 3, 5);
  for (int s = 0; s < 5; ++s) t += rec(1, 3, s, "done");
  write(dir / "ringflow-flight.1.jsonl", t);

  const auto dumps = load_all(dir);
  REQUIRE(dumps.size() == 3);
  const auto rep = doc::diagnose(dumps);
  REQUIRE(rep.comms.size() == 1);
  const auto& c = rep.comms[0];
  CHECK(rep.problem);
  CHECK(c.front == 5);
  CHECK(c.behind == std::vector<int>{1});
  CHECK(c.missing.empty());
  CHECK(c.disagreements.empty());
  REQUIRE(c.ranks.size() == 3);
  CHECK(*c.ranks[1].last_done == 4);
  REQUIRE(c.ranks[0].in_flight);
  CHECK(c.ranks[0].in_flight->wait_peer == 1);

  const std::string text = doc::render(rep, dumps);
  INFO(text);
  CHECK(text.find("BEHIND: rank 1 is at #4") != std::string::npos);
  CHECK(text.find("ranks 0,2 are in #5 allreduce(float, sum, count=256)") != std::string::npos);
  CHECK(text.find("waiting on rank 1 (tag 16385) for 1.0 s") != std::string::npos);

  std::string out;
  CHECK(run_doctor(dir.string(), out) == 1);
  CHECK(out.find("BEHIND: rank 1") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("doctor: ranks that called different collectives disagree", "[doctor]") {
  const fs::path dir = scratch("disagree");
  write(dir / "ringflow-flight.0.jsonl", header(0) + comm_line(0, 3, 3) + rec(0, 3, 0, "done") +
                                             rec(0, 3, 1, "done") + rec(0, 3, 2, "failed"));
  write(dir / "ringflow-flight.1.jsonl", header(1) + comm_line(1, 3, 3) + rec(1, 3, 0, "done") +
                                             rec(1, 3, 1, "done") +
                                             rec(1, 3, 2, "failed", "double", 256));
  const auto dumps = load_all(dir);
  const auto rep = doc::diagnose(dumps);
  REQUIRE(rep.comms.size() == 1);
  const auto& c = rep.comms[0];
  CHECK(c.missing == std::vector<int>{2});
  REQUIRE(c.disagreements.size() == 1);
  CHECK(c.disagreements[0].seq == 2);
  const std::string text = doc::render(rep, dumps);
  INFO(text);
  CHECK(text.find("DISAGREE at #2: rank 0 called allreduce(float, sum, count=256); rank 1 called "
                  "allreduce(double, sum, count=256)") != std::string::npos);
  CHECK(text.find("no dump from rank 2") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("doctor: agreeing ranks are no problem", "[doctor]") {
  const fs::path dir = scratch("ok");
  for (int r : {0, 1}) {
    write(dir / ("ringflow-flight." + std::to_string(r) + ".jsonl"),
          header(r) + comm_line(r, 2, 2) + rec(r, 2, 0, "done") + rec(r, 2, 1, "done"));
  }
  const auto rep = doc::diagnose(load_all(dir));
  CHECK_FALSE(rep.problem);
  std::string out;
  CHECK(run_doctor(dir.string(), out) == 0);
  CHECK(out.find("verdict: no problem found") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("doctor: a real dump of a run where one rank skips a collective", "[doctor]") {
  const fs::path dir = scratch("real");
  try {
    ringflow::local::run(3, [](ringflow::communicator& c) {
      c.raw().set_timeout(std::chrono::milliseconds(500));
      std::vector<float> g(256, 1.0f);
      for (int i = 0; i < 5; ++i) {
        if (c.rank() == 1 && i == 3) continue;  // rank 1 skips #3 and so runs one fewer
        ringflow::allreduce(c, std::span(g), ringflow::sum, ringflow::algo::ring);
      }
    });
  } catch (const ringflow::error&) {}
  // The group's communicators are gone; their rings are kept for dumps.
  ringflow::flight::dump_to((dir / "ringflow-flight.pid.jsonl").string(), "test");
  const auto dumps = load_all(dir);
  const auto rep = doc::diagnose(dumps);
  // Find this run's group: three ranks, rank 1 behind.
  const auto it = std::find_if(rep.comms.begin(), rep.comms.end(), [](const doc::comm_report& c) {
    return c.size == 3 && c.behind == std::vector<int>{1};
  });
  INFO(doc::render(rep, dumps));
  REQUIRE(it != rep.comms.end());
  CHECK(it->front == 4);
  REQUIRE(it->ranks.size() == 3);
  CHECK(it->ranks[1].highest == 3);  // rank 1's 4th call was #3 (the others' #4)
  CHECK(*it->ranks[1].last_done == 3);
  // Ranks 0 and 2 failed in #4: rank 1 had returned.
  CHECK(std::find(it->failed.begin(), it->failed.end(), 0) != it->failed.end());
  fs::remove_all(dir);
}

TEST_CASE("doctor: a bad file is one error line naming it, exit status 2", "[doctor]") {
  const fs::path dir = scratch("bad");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"empty.jsonl", ""},
      {"garbage.jsonl", "\x01\x02not json at all\n"},
      {"noheader.jsonl", rec(0, 2, 0, "done")},
      {"badrank.jsonl", header(0) + rec(5, 2, 0, "done")},
      {"badstate.jsonl", header(0) + rec(0, 2, 0, "exploded")},
      {"truncated.jsonl", header(0) + rec(0, 2, 0, "done").substr(0, 40)},
      {"array.jsonl", "[1,2,3]\n"},
      {"huge.jsonl", header(0) + "{\"type\":\"record\",\"seq\":-5}\n"},
  };
  for (const auto& [name, text] : cases) {
    const fs::path p = dir / name;
    write(p, text);
    INFO(name);
    CHECK_THROWS_AS(doc::load_dump(p.string()), doc::load_error);
    std::string out;
    CHECK(run_doctor(p.string(), out) == 2);
    CHECK(out.find(p.string()) != std::string::npos);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
  }
  std::string out;
  CHECK(run_doctor((dir / "missing.jsonl").string(), out) == 2);
  CHECK(run_doctor("--bogus", out) == 2);
  CHECK(run_doctor(dir.string(), out) == 2);  // no ringflow-flight.*.jsonl inside
  fs::remove_all(dir);
}
